# hirespath — common commands. `make install && make test` is what CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export WANDB_MODE ?= offline

.PHONY: install test test-all demo benchmark clean help

help:
	@echo "make install   create .venv and install hirespath (editable) with test and launcher extras"
	@echo "make test      fast CPU test suite (excludes @pytest.mark.slow)"
	@echo "make test-all  every test, slow ones included"
	@echo "make demo      end-to-end demo on generated data with the tiny preset (CPU, a few minutes)"
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

demo:
	$(PY) tasks/benchmark.py backbone=tiny 'resolutions=[224,448,896]' repeats=2

benchmark:
	$(PY) tasks/benchmark.py experiment=cpu_speed

clean:
	rm -rf logs outputs multirun .pytest_cache
