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

# What the launch tests run for real: sshd + pdsh (hostfile launch), a one-node SLURM cluster with munge.
SYSTEM_PACKAGES := openssh-server openssh-client pdsh slurmctld slurmd slurm-client munge

.PHONY: setup system-deps test test-fast bench study study-long study-grin pretrain clean

setup: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q -e '.[test,mpi]'
	touch $@

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
	  echo "not installing $$missing (needs root and apt-get): the launch tests that need them skip, saying so"; \
	fi

# Three workers, a test file each at a time (a file's fixtures are built once, its tests run in order): a launched
# job keeps 2 cores busy only part of the time (start-up, barriers, waits); with two workers the suite kept 1.75 of
# this machine's 2 cores busy, and a third file fills the gaps.
TEST_WORKERS ?= 3
# Tests marked "alone" (one that stops jobs it does not own) run after the rest, by themselves.
test: setup system-deps
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 -m "not alone" tests
	$(BIN)/python -m pytest -q -m alone tests

# For iterating: the tests that start no training job (the estimator, the router core, gates, model, configs,
# data, pre-flight).
FAST_TESTS := tests/test_routing.py tests/test_router_core.py tests/test_gate.py tests/test_model.py \
  tests/test_config.py tests/test_data.py tests/test_preflight.py
test-fast: setup
	$(BIN)/python -m pytest -q $(FAST_TESTS)

pretrain: setup $(DATA)/meta.json
	launch/local.sh --config $(CONFIG) --nproc $(NPROC) -- --set data.path=$(DATA) $(ARGS)

$(DATA)/meta.json: | $(STAMP)
	$(BIN)/sparsemixer-ds prepare --out $(DATA)

bench: setup $(DATA)/meta.json
	$(BIN)/python benchmarks/gate.py
	$(BIN)/python benchmarks/gate.py --sizes
	$(BIN)/python benchmarks/train_options.py
	$(BIN)/python benchmarks/plan_check.py --data $(DATA)
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/moe_layer.py
	$(BIN)/deepspeed --num_gpus 2 benchmarks/moe_layer.py
	$(BIN)/python benchmarks/e2e.py --data $(DATA)
	$(BIN)/python benchmarks/model_step.py
	$(BIN)/python benchmarks/fidelity.py
	$(BIN)/python benchmarks/growth.py
	$(BIN)/deepspeed --num_gpus 2 benchmarks/autoep.py --mode router
	$(BIN)/deepspeed --num_gpus 2 benchmarks/autoep.py --mode family
	for zero in 2 3; do $(BIN)/deepspeed --num_gpus 2 benchmarks/autoep.py --mode memory --zero $$zero --ep-size 1 \
	  --hidden 512 --intermediate 1024 --batch 4 --repeats 5 || exit 1; done

# The convergence study's short regime (about 45 minutes on 2 cores; results in benchmarks/results/).
study: setup $(DATA)/meta.json
	$(BIN)/python benchmarks/convergence.py --set data.path=$(DATA)
	$(BIN)/python benchmarks/convergence.py --set data.path=$(DATA) --top-k 2 --arms gshard sparsemixer-v2 \
	  --baseline gshard --out benchmarks/results/convergence-top2

# Its longer regime: 16 experts, 3,000 steps (6.1M tokens per run), seeds 0-2, four arms, two processes side by
# side with one thread each (about 75 minutes on 2 cores). Resumable: finished (arm, seed) runs are kept.
LONG = --set data.path=$(DATA) --set moe.num_experts=16 --set train.steps=3000 --set eval.interval=250 \
  --threads 1 --out benchmarks/results/convergence-16e
study-long: setup $(DATA)/meta.json
	$(BIN)/python benchmarks/convergence.py $(LONG) --arms switch sparsemixer-v2 & \
	  $(BIN)/python benchmarks/convergence.py $(LONG) --arms sparsemixer midpoint-all; wait
	$(BIN)/python benchmarks/convergence.py $(LONG) --arms switch sparsemixer sparsemixer-v2 midpoint-all --report-only

# GRIN's recipe separated (benchmarks/grin_study.py): router x balance at top-1 and top-2 (8 arms), the 16-expert
# regime (3,000 steps), 5 seeds per arm, each run on 2 data-parallel ranks so that global balance is real; then
# more seeds (up to GRIN_EXTEND_TO) for the arms whose interval stays undecided. Resumable, and runs in parts:
# make study-grin GRIN_ARMS="switch+local sparsemixer+global" GRIN_SEEDS="0 1"; GRIN_EXTEND_TO=16 goes on past 10.
GRIN_ARMS ?= switch+local switch+global sparsemixer+local sparsemixer+global gshard+local gshard+global \
  sparsemixer-v2+local sparsemixer-v2+global
GRIN_SEEDS ?= 0 1 2 3 4
GRIN_EXTEND_TO ?= 10
study-grin: setup $(DATA)/meta.json
	$(BIN)/python benchmarks/grin_study.py --set data.path=$(DATA) --arms $(GRIN_ARMS) --seeds $(GRIN_SEEDS) \
	  --extend-to $(GRIN_EXTEND_TO)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
