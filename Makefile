# Fresh machine:  make demo   (set up + default LOST job)     make test   (set up + test suite)
PYTHON ?= python3
VENV ?= .venv
# CPU machines: the pinned CPU wheel. GPU machines: make TORCH="torch" (or any CUDA build).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo compare test bench clean

$(BIN)/lostlm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch in the same command, so nothing pulls a multi-GB CUDA build first
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[test]"
	touch $@

setup: $(BIN)/lostlm

demo: setup
	$(BIN)/lostlm train

compare: setup
	$(BIN)/lostlm train
	$(BIN)/lostlm train --method full

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
