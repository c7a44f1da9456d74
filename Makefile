# `make run`: set up .venv, train the `small` model on an emulated 8-device CPU mesh,
# checkpoint, report held-out loss, then decode a sample.  `make test`: the test suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/small
DEVICES ?= 8
RUN_FLAGS ?=
export XLA_FLAGS := --xla_force_host_platform_device_count=$(DEVICES)
# Huge pages for glibc's large blocks (read at process start; no effect unless transparent huge
# pages are in `madvise` mode): XLA:CPU's per-step buffers then fault in 2 MiB at a time.
export GLIBC_TUNABLES := $(if $(GLIBC_TUNABLES),$(GLIBC_TUNABLES):)glibc.malloc.hugetlb=1

.PHONY: run test test-slow format bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.base: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: setup.cfg pyproject.toml $(VENV)/.base
	$(BIN)/pip install -q -e ".[test,hf,notebooks]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

run: $(VENV)/.base
	$(BIN)/python -m experiments.train --config=configs/dsv3.py:small --workdir=$(WORKDIR) $(RUN_FLAGS)
	$(BIN)/python -m experiments.decode --workdir=$(WORKDIR) --prompt="def main(" \
	    --prompt="import " --prompt="class Config:" --max_new_tokens=96 \
	    --temperature=0.7 --top_p=0.9

# Two pytest workers (pytest-xdist): one compiles while the other runs, on 2 cores ~20% less
# wall time; each peaks at ~6 GB. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: $(VENV)/.test
	$(BIN)/ruff format --check --quiet . || (echo "run 'make format' (ruff format)"; exit 1)
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist worksteal tests

format: $(VENV)/.test
	$(BIN)/ruff format .

test-slow: $(VENV)/.test
	$(BIN)/python -m pytest -q -m slow tests

# On a GPU machine (with jax[cuda12] installed in .venv): benchmarks + numerics, < 8 minutes.
gpu-check: $(VENV)/.test
	PYTHON=$(BIN)/python experiments/gpu_check.sh runs/gpu_check

clean:
	rm -rf $(VENV) runs
