# Every target sets itself up: a fresh machine needs only python3 (>= 3.9) and make.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch 2.13.0 on CPU machines; on GPU machines pass e.g. TORCH_SPEC='torch==2.13.0'
# with the CUDA index of your cluster. Any torch the setup.py range admits works.
TORCH_SPEC ?= torch==2.13.0
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed

# The venv's bin first on PATH in every job: the deepspeed launcher, and the same ninja that built
# DeepSpeed's cached ops (a different ninja first on PATH forces a rebuild).
export PATH := $(BIN):$(PATH)
# DeepSpeed on machines without a GPU: the CPU accelerator with gloo collectives.
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export DS_ACCELERATOR ?= cpu
endif

# make pretrain: prepare the default corpus (the stdlib sources) once, then the main job.
CONFIG ?= configs/cpu_small.yaml
DATA ?= data/stdlib-bytes
NPROC ?= 2
ARGS ?=

.PHONY: setup test bench pretrain clean

setup: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q -e '.[test,mpi]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q tests

pretrain: setup $(DATA)/meta.json
	launch/local.sh --config $(CONFIG) --nproc $(NPROC) -- --set data.path=$(DATA) $(ARGS)

$(DATA)/meta.json: | $(STAMP)
	$(BIN)/sparsemixer-ds prepare --out $(DATA)

bench: setup
	$(BIN)/python benchmarks/gate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
