# hirespath — common commands. `make install && make test` is what CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export WANDB_MODE ?= offline

.PHONY: install test test-all lint format demo benchmark clean help

help:
	@echo "make install   create .venv and install hirespath (editable, with .venv/bin/hirespath) + test and launcher extras"
	@echo "make test      fast CPU test suite (excludes @pytest.mark.slow)"
	@echo "make test-all  every test, slow ones included"
	@echo "make lint      ruff lint + format check + import layers (lint-imports; CI runs it before the tests)"
	@echo "make format    ruff format + safe lint fixes"
	@echo "make demo      end-to-end demo on generated data with the tiny preset (CPU, about 1.5 minutes)"
	@echo "make benchmark CPU benchmark of the attention modes (see README, Benchmarks)"

$(PY):
	python3 -m venv $(VENV)

install: $(PY)
	# torch 2.14.1 + torchvision 0.29.1 is the pair whose wheels work together here (CUDA builds, run on CPU too).
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e ".[test,launchers]"

test:
	$(PY) -m pytest -m "not slow" -q

test-all:
	$(PY) -m pytest -q

LINT_PATHS := src tasks tests notebooks setup.py

# lint-imports checks the layers contract in pyproject.toml ([tool.importlinter]; docs/design.md): no upward imports.
lint:
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	PYTHONPATH=src $(VENV)/bin/lint-imports

format:
	$(PY) -m ruff check --fix $(LINT_PATHS)
	$(PY) -m ruff format $(LINT_PATHS)

DEMO_DATA ?= data/panda_synthetic
DEMO_ARGS ?= data.root=$(DEMO_DATA) data.fov_um=512 backbone=tiny resolution=448 attention=sparse pruner=global_attention pruner.prune_layer=2 logger=wandb

demo:
	# A small synthetic PANDA (real layout: pyramidal TIFFs + train.csv), then classification on CPU with the
	# tiny preset: KNN, then the linear probe (which reuses the cached embeddings). W&B runs offline.
	test -f $(DEMO_DATA)/train.csv || $(PY) tasks/make_synthetic.py dataset=panda root=$(DEMO_DATA) num_slides=36
	$(PY) tasks/classify.py $(DEMO_ARGS) head=knn head.k=5
	$(PY) tasks/classify.py $(DEMO_ARGS) head=linear_probe

benchmark:
	$(PY) tasks/benchmark.py experiment=cpu_speed

clean:
	rm -rf logs outputs multirun .pytest_cache
