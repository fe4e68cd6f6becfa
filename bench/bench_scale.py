"""Memory and speed of the training modes and the generation engines at real sizes: full fine-tuning
against LoRA, with and without gradient checkpointing, for SFT and GRPO steps and the pairs stage, with our
sampler (hf) or vLLM, through the stages' real entry points.

    python -m bench.bench_scale --model DIR                       # a saved chat model (e.g. .real/models/base)
    python -m bench.bench_scale --arch smollm2-1.7b --tokenizer DIR   # random weights of that shape, for size
    python -m bench.bench_scale --model FILE.gguf --engines hf,vllm --stages grpo,pairs --cases full --repeats 3

--engines runs every case with each generation engine (`make vllm` first), interleaved run by run so that a
change in the machine's load falls on both; the vLLM engine computes in bf16 on a GPU or a CPU with native
bf16 units, in fp32 elsewhere (--vllm-dtype overrides). "step s" is the median wall time of a GRPO step
after the first (cost/wall_s between logged steps: generation, scoring, the reference and old log-probs,
the update, the weight push); "gen share" and "rollout tokens/s" are over the whole run.

Each case is one `python -m stages.sft` or `python -m stages.align grpo` process (peak memory is per
process: the CUDA allocator's peak on a GPU, peak RSS on the CPU) on the embedded chat task, tokenized
by prepare with the model's tokenizer. With --arch the weights are random: the throughput and memory
of a model that size are real, its answers are not (the GRPO reward is then a random-headed reward
model's score, so the rewards vary and the gradients are real). Prints a markdown table and writes
what it measured to --out. Every figure is measured in this run; nothing is estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ARCHS = {  # Llama-architecture shapes (SmolLM2 family), the vocabulary is the tokenizer's
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4),  # ~1.07B with SmolLM2's 49k vocabulary
}
ENGINE_KEYS = ("engine/start_s", "engine/push_s", "engine/reload_s", "engine/push_logp_gap", "rollout/sampler_logp_gap",
               "rollout/tis_capped")
CASES = {  # name → settings of the trained section
    "full": {},
    "full+gc": {"gradient_checkpointing": True},
    "lora": {"lora": {"r": 16}},
    "lora+gc": {"lora": {"r": 16}, "gradient_checkpointing": True},
}


def build_random(arch: str, tokenizer: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **ARCHS[arch])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    for f in ("generation_config.json", "chat_template.jinja"):
        if (tokenizer / f).exists():
            shutil.copy(tokenizer / f, out / f)


def params(model: str, sft_steps: int, grpo_steps: int, max_new_tokens: int, prompts_per_step: int = 8,
           num_generations: int = 8) -> dict:
    return {
        "pairs": {"num_samples": 8, "max_new_tokens": max_new_tokens, "max_prompts": 32, "batch_size": 64,
                  "score": {"reward_model": 1.0}},
        "seed": 0,
        "model": {"name_or_path": model},
        "data": {"embedded": {"task": "chat_arithmetic", "n_sft": 512, "n_preference": 16, "n_prompts": 256,
                              "n_eval": 16}},
        "sft": {"lr": 1e-5, "batch_size": 16, "steps": sft_steps, "log_every": 1, "probes": 0},
        "align": {"methods": ["grpo"], "grpo": {
            "lr": 1e-5, "steps": grpo_steps, "prompts_per_step": prompts_per_step, "num_generations": num_generations,
            "max_new_tokens": max_new_tokens, "gen_batch_size": 64, "log_every": 1, "probes": 0,
            "no_signal_steps": 0, "beta": 0.04, "reward": {"reward_model": 1.0}}},
        "verifier": {"extract": "auto", "compare": "exact"},
    }


def run_case(ws: Path, stage: str, case: str, env: dict, engine: str = "hf", vllm_dtype: str = "float32") -> dict:
    p = yaml.safe_load((ws / "params.base.yaml").read_text())
    section = {"sft": p["sft"], "grpo": p["align"]["grpo"], "pairs": {}}[stage]
    section.update(CASES[case] if stage != "pairs" else {})
    p["generation"] = {"engine": engine, "dtype": vllm_dtype}
    (ws / "params.yaml").write_text(yaml.safe_dump(p))
    out = f"models/{stage}_{case}_{engine}"
    if stage == "sft":
        cmd = ["stages.sft", "--train", "data/sft.jsonl", "--probe", "data/prompts.jsonl", "--base", "models/base"]
    elif stage == "pairs":
        return run_pairs(ws, case, env, engine)
    else:
        cmd = ["stages.align", "grpo", "--pairs", "pairs", "--prompts", "data/prompts.jsonl", "--sft", "models/sft",
               "--reward", "models/reward"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *cmd, "--out", out, "--metrics", f"{out}.json",
                           "--plots", f"{out}.csv"], cwd=ws, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"stage": stage, "case": case, "engine": engine,
                "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    m = json.loads((ws / f"{out}.json").read_text())
    rows = [r for r in _csv(ws / f"{out}.csv") if r.get("perf/tokens_per_sec")]
    walls = [r["cost/wall_s"] for r in rows if r.get("cost/wall_s") is not None]
    step_s = sorted(b - a for a, b in zip(walls, walls[1:]))
    shutil.rmtree(ws / out, ignore_errors=True)
    return {"stage": stage, "case": case, "engine": engine, "process_s": round(wall, 1),
            "peak_mem_mb": round(m["cost/peak_mem_mb"]), "tokens_per_sec": round(m.get("perf/tokens_per_sec", 0)),
            "rollout_tokens_per_sec": round(m.get("perf/rollout_tokens_per_sec", 0)),
            "gen_share": round(m.get("perf/gen_share", 0), 3), "train_s": round(m["cost/wall_s"], 1),
            "step_s": round(step_s[len(step_s) // 2], 2) if step_s else None,
            "steps": len(rows), "models_in_memory": m.get("cost/models_in_memory"),
            **{k: round(m[k], 6) for k in ENGINE_KEYS if k in m}}


def run_pairs(ws: Path, case: str, env: dict, engine: str) -> dict:
    """The pairs stage: K samples of each prompt from the SFT policy, scored by the reward model."""
    out = f"pairs_{engine}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "stages.pairs", "--prompts", "data/prompts.jsonl", "--sft",
                           "models/sft", "--reward", "models/reward", "--out", out, "--metrics", f"{out}.json"],
                          cwd=ws, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"stage": "pairs", "case": case, "engine": engine,
                "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    m = json.loads((ws / f"{out}.json").read_text())
    shutil.rmtree(ws / out, ignore_errors=True)
    return {"stage": "pairs", "case": case, "engine": engine, "process_s": round(wall, 1),
            "peak_mem_mb": round(m["cost/peak_mem_mb"]), "rollout_tokens_per_sec": round(m["perf/gen_tokens_per_sec"]),
            "train_s": round(m["cost/wall_s"], 1), "samples": m["pairs/n_samples"],
            "tokens_generated": m["cost/tokens_generated"], **{k: round(m[k], 6) for k in ENGINE_KEYS if k in m}}


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return [{k: float(v) if v not in ("", None) else None for k, v in r.items()} for r in csv.DictReader(f)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a saved chat model directory")
    ap.add_argument("--arch", choices=sorted(ARCHS), help="random weights of this shape (with --tokenizer)")
    ap.add_argument("--tokenizer", type=Path, help="a directory holding the tokenizer (and chat template)")
    ap.add_argument("--workspace", type=Path, default=Path("/tmp/alignpipe-bench-scale"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--stages", default="grpo,sft")
    ap.add_argument("--sft-steps", type=int, default=4)
    ap.add_argument("--grpo-steps", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompts-per-step", type=int, default=8, help="GRPO prompts per step (default 8)")
    ap.add_argument("--num-generations", type=int, default=8, help="GRPO completions per prompt (default 8)")
    ap.add_argument("--engines", default="hf", help="generation engines, comma-separated: hf, vllm")
    ap.add_argument("--vllm-dtype", choices=["float32", "bfloat16"], help="default: bf16 where the machine has it")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every case and engine, interleaved")
    ap.add_argument("--out", type=Path, default=Path("bench_scale.json"))
    a = ap.parse_args()
    if bool(a.model) == bool(a.arch):
        ap.error("give --model or --arch")
    ws = a.workspace
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "ALIGNPIPE_TRACKING": "off"}
    source = a.model
    if a.arch:
        source = str(ws / "src")
        build_random(a.arch, a.tokenizer, Path(source))
    (ws / "params.base.yaml").write_text(yaml.safe_dump(params(str(Path(source).resolve()), a.sft_steps, a.grpo_steps,
                                                               a.max_new_tokens, a.prompts_per_step,
                                                               a.num_generations)))
    shutil.copy(ws / "params.base.yaml", ws / "params.yaml")
    t0 = time.perf_counter()
    prep = subprocess.run([sys.executable, "-m", "stages.prepare", "--data-out", "data", "--model-out", "models/base"],
                          cwd=ws, env=env, capture_output=True, text=True)
    if prep.returncode:
        sys.exit(f"prepare failed: {prep.stderr.strip()[-2000:]}")
    shutil.copytree(ws / "models" / "base", ws / "models" / "sft")
    shutil.copytree(ws / "models" / "base", ws / "models" / "reward")  # read as a 1-label classifier: random head
    (ws / "pairs").mkdir()
    print(f"prepared in {time.perf_counter() - t0:.0f}s: {prep.stdout.strip().splitlines()[-1]}", flush=True)

    import torch

    from stages.core import models

    fast_bf16 = torch.cuda.is_available() or models.cpu_has_fast_bf16()
    vllm_dtype = a.vllm_dtype or ("bfloat16" if fast_bf16 else "float32")
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "threads": torch.get_num_threads(), "model": a.model or a.arch,
               "vllm_dtype": vllm_dtype, "cases": []}
    for stage in a.stages.split(","):
        for case in a.cases.split(",") if stage != "pairs" else ["full"]:
            for _ in range(a.repeats):
                for engine in a.engines.split(","):
                    r = run_case(ws, stage, case, env, engine, vllm_dtype)
                    results["cases"].append(r)
                    print(json.dumps(r), flush=True)
                    a.out.write_text(json.dumps(results, indent=1))  # a cut-short run keeps what it measured
    print(f"\n{results['model']} on {results['device']} (torch {results['torch']}; vLLM in {vllm_dtype})\n")
    print("| stage | case | engine | peak MB | train tokens/s | rollout tokens/s | gen share | step s | stage s "
          "| models |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["cases"]:
        if "error" in r:
            print(f"| {r['stage']} | {r['case']} | {r['engine']} | error: {r['error']} |")
            continue
        print(f"| {r['stage']} | {r['case']} | {r['engine']} | {r['peak_mem_mb']} | {r.get('tokens_per_sec', '')} | "
              f"{r['rollout_tokens_per_sec'] or ''} | {r.get('gen_share') or ''} | {r.get('step_s') or ''} | "
              f"{r['train_s']} | {r.get('models_in_memory') or ''} |")


if __name__ == "__main__":
    main()
