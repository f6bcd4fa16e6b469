# ace-lightning: one place for every command. `make install`, then `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.install-stamp
# Two cores: one torch thread per process avoids OpenMP spin-waiting under contention.
TEST_ENV := OMP_NUM_THREADS=1 WANDB_MODE=disabled

# make gpu-check: DEVICE=cuda on a GPU machine, DEVICE=cpu for the same script on the CPU
DEVICE ?= cuda
GPU_WHEELS := gpu-wheels
GPU_VENV := .gpu-venv
# what the GPU machine lacks (it has torch, lightning, timm, numpy, scipy, matplotlib, pyarrow, tqdm)
GPU_DEPS := hydra-core==1.3.8 omegaconf==2.3.0 appdirs==1.4.4
GPU_SDISTS := antlr4-python3-runtime==4.9.3 auto-LiRPA==0.3

.PHONY: install data test test-all bench demo demo-gate demo-seeds reproduce-cifar clean help gpu-check gpu-wheels

help:
	@echo "make install   create .venv with the pinned stack (requirements/constraints.txt)"
	@echo "make data      the demo's data for offline runs (Fashion-MNIST: Debian package or download)"
	@echo "make test      fast tests (under 10 minutes on 2 cores)"
	@echo "make test-all  fast + slow tests"
	@echo "make bench     benchmarks -> benchmarks/results/<date>.json"
	@echo "make demo      the whole ACE pipeline on Fashion-MNIST (eps 0.1) on a CPU (margin selection)"
	@echo "make demo-gate the longer demo (demo_fmnist_full) with margin and the paper's selection network"
	@echo "make demo-seeds the demo over seeds 0, 1, 2: runs/summary_seeds.md (mean +- std)"
	@echo "make reproduce-cifar   the paper's CIFAR-10 recipes (GPUs); SMOKE=1: tiny CPU run"
	@echo "make gpu-check the GPU check (benchmarks/gpu_check.py); DEVICE=cpu: the same on the CPU"
	@echo "make gpu-wheels  Python 3.12 wheels the GPU machine lacks (needs the package registries)"

install: $(STAMP)

$(STAMP): requirements/constraints.txt requirements/lirpa.txt requirements/data.txt setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c requirements/constraints.txt -e '.[test,search]'
	$(PIP) install --quiet --no-deps -r requirements/lirpa.txt
	$(PIP) install --quiet --no-deps -c requirements/constraints.txt -r requirements/data.txt
	$(PY) -c "import ace_lightning.bounds as b; import lightning, hydra, timm, wandb, optuna; print('ace-lightning installed; auto_LiRPA compat patches:', sorted(k for k, v in __import__('ace_lightning.bounds.compat', fromlist=['APPLIED']).APPLIED.items() if v))"
	@touch $(STAMP)

# -n 2: one pytest worker per core, each with one torch thread (TEST_ENV)
test: install
	$(TEST_ENV) $(PY) -m pytest -m "not slow" -q -n 2

test-all: install
	$(TEST_ENV) $(PY) -m pytest -q -n 2

bench: install
	$(PY) benchmarks/run.py

# The demo's data on this machine: already there, else the Debian package (apt-get, as root), else
# downloaded, else one line saying what to do (ace_lightning/data/fetch.py).
data: install
	$(PY) -m ace_lightning.data.fetch fashion_mnist

# The whole pipeline as one job: core, cert-net, gate, certification + sweep + attack; the certify
# stage prints the table, the pipeline its stage times and where the results are (runs/summary.md
# collects every certified run).
demo: data
	$(PY) -m ace_lightning.train stage=pipeline experiment=demo_fmnist $(ARGS)

# The paper's selection network on the longer demo's nets (experiment=demo_fmnist_full: core 4 epochs,
# cert-net 24; the gate tuned for them), margin and gate selection on one plot and in one table:
# runs/demo_fmnist_full/eps_0.1/compare/.
demo-gate: data
	$(PY) -m ace_lightning.train stage=pipeline experiment=demo_fmnist_full $(ARGS)
	$(PY) -m ace_lightning.train stage=pipeline experiment=demo_fmnist_full ++stage_overrides.certify.selection=gate $(ARGS)
	$(PY) -m ace_lightning.cli action=compare 'runs=[runs/demo_fmnist_full/eps_0.1]' out_dir=runs/demo_fmnist_full/eps_0.1/compare \
		'methods=[IBP,CROWN-IBP]'

# The demo over three seeds (seed 0 is `make demo`'s run folder, skipped when complete; seeds 1
# and 2 in runs/demo_fmnist/eps_0.1_seed<n>/): runs/summary_seeds.md holds mean +- std per point.
demo-seeds: data
	$(PY) -m ace_lightning.train -m stage=pipeline experiment=demo_fmnist seed=0,1,2 $(ARGS)

reproduce-cifar: install
	$(PY) -m ace_lightning.pipeline $(if $(filter 1,$(SMOKE)),--smoke --runs-root runs/smoke,) $(ARGS)

# The GPU machine has no registry: its missing pure-Python packages travel as wheels (carry gpu-wheels).
gpu-wheels: install
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d $(GPU_WHEELS) $(GPU_DEPS)
	$(PIP) wheel --quiet --no-deps -w $(GPU_WHEELS) $(GPU_SDISTS)
	@ls $(GPU_WHEELS)

ifeq ($(DEVICE),cpu)
gpu-check: install
	$(TEST_ENV) $(PY) benchmarks/gpu_check.py --device cpu $(ARGS)
else
gpu-check:
	@ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1 || { echo "error: no wheels in $(GPU_WHEELS)/: run make gpu-wheels on a machine with the package registries"; exit 2; }
	test -x $(GPU_VENV)/bin/python || python3 -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --no-deps --no-index $(GPU_WHEELS)/*.whl
	WANDB_MODE=disabled $(GPU_VENV)/bin/python benchmarks/gpu_check.py --device cuda $(ARGS)
endif

clean:
	rm -rf $(VENV) $(GPU_VENV) .pytest_cache build src/*.egg-info
