# ace-lightning: one place for every command. `make install`, then `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.install-stamp
# Two cores: one torch thread per process avoids OpenMP spin-waiting under contention.
TEST_ENV := OMP_NUM_THREADS=1 WANDB_MODE=disabled

.PHONY: install test test-all bench demo reproduce-cifar clean help

help:
	@echo "make install   create .venv with the pinned stack (requirements/constraints.txt)"
	@echo "make test      fast tests (under 10 minutes on 2 cores)"
	@echo "make test-all  fast + slow tests"
	@echo "make bench     benchmarks -> benchmarks/results/<date>.json"
	@echo "make demo      the whole ACE pipeline on Fashion-MNIST (eps 0.1) on a CPU"
	@echo "make reproduce-cifar   the paper's CIFAR-10 recipes (GPUs); SMOKE=1: tiny CPU run"

install: $(STAMP)

$(STAMP): requirements/constraints.txt requirements/lirpa.txt setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c requirements/constraints.txt -e '.[test]'
	$(PIP) install --quiet --no-deps -r requirements/lirpa.txt
	$(PY) -c "import ace_lightning.bounds as b; import lightning, hydra, timm, wandb; print('ace-lightning installed; auto_LiRPA compat patches:', sorted(k for k, v in __import__('ace_lightning.bounds.compat', fromlist=['APPLIED']).APPLIED.items() if v))"
	@touch $(STAMP)

test: install
	$(TEST_ENV) $(PY) -m pytest -m "not slow" -q

test-all: install
	$(TEST_ENV) $(PY) -m pytest -q

bench: install
	$(PY) benchmarks/run.py

# The whole pipeline in one Hydra multirun: core, cert-net, gate, certification + sweep + attack.
demo: install
	$(PY) -m ace_lightning.train -m experiment=demo_fmnist stage=core,cert,gate,certify $(ARGS)
	@$(PY) -m ace_lightning.summary runs/demo_fmnist/eps_0.1

reproduce-cifar: install
	$(PY) -m ace_lightning.pipeline $(if $(filter 1,$(SMOKE)),--smoke --runs-root runs/smoke,) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
