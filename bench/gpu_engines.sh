#!/usr/bin/env bash
# The GPU check of the generation engines (README, "Generation engines"), prepared as one short script for a
# CUDA machine on which vLLM can be installed: the 1.07B GRPO case of bench.bench_scale (TinyLlama's shape,
# SmolLM2's 49k vocabulary, random weights, 8 prompts x 8 completions x 128 new tokens, a reward model)
# with our sampler and with vLLM (bf16), 4 steps each, interleaved, 2 repeats. Writes bench_engines_gpu.json
# and prints the table. Goal of issue 18: >= 10x our sampler's rollout tokens/s, generation <= 50% of a step.
#
#     bash bench/gpu_engines.sh            # about 10 minutes on one H100/H200 after the installs
set -euo pipefail
cd "$(dirname "$0")/.."
make setup
make vllm VLLM_REQUIREMENTS=engines/vllm-gpu.txt
BIN=.venv/bin
GGUF=$($BIN/python -c "from flows.real import fetch_gguf; print(fetch_gguf())")
TOK=${TMPDIR:-/tmp}/alignpipe-smollm2-tokenizer
$BIN/python -c "import sys; from stages.core import models; models.load_gguf(sys.argv[1])[0].save_pretrained(sys.argv[2])" \
    "$GGUF" "$TOK"
PYTHONUNBUFFERED=1 $BIN/python -m bench.bench_scale --arch tinyllama-1.1b --tokenizer "$TOK" --engines hf,vllm \
    --stages grpo --cases full --grpo-steps 4 --max-new-tokens 128 --repeats 2 --out bench_engines_gpu.json
