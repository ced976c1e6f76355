# Every target is self-sufficient on a fresh machine (Python 3.11 and network access to PyPI/Debian).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.mpqat-installed
DEMO   ?= runs/demo

.PHONY: setup data demo test test-all bench-smoke clean

setup: $(STAMP) data

# torch is installed first and pinned, so no dependency can pull a CUDA build (see README, "GPU").
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# NVIDIA Sionna (radio datasets rf-*): --no-deps, or its requirements would pull another torch;
	# importlib-resources is the only one of them that mpqat's dependencies do not already bring.
	$(BIN)/pip install -q --no-deps sionna-no-rt==2.2.0 importlib-resources==7.1.0
	touch $(STAMP)

data: $(STAMP)
	$(BIN)/mpqat data fetch all

demo: setup
	$(BIN)/mpqat train --dataset telco-churn --config configs/nmp-budget.yaml --epochs 60 --lr 2e-3 --out $(DEMO) --force
	$(BIN)/mpqat report $(DEMO)
	$(BIN)/mpqat export $(DEMO) --out $(DEMO)/model.mpq --onnx $(DEMO)/model.onnx --c $(DEMO)/c
	$(BIN)/mpqat run $(DEMO)/model.mpq --dataset telco-churn
	$(BIN)/mpqat inspect $(DEMO)/model.mpq

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m ''

bench-smoke: setup
	$(BIN)/mpqat bench --suite smoke --out runs/bench-smoke

clean:
	rm -rf $(VENV) runs .pytest_cache
