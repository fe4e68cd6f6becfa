"""Training throughput of our DPO and GRPO steps against TRL 1.16's DPOTrainer and GRPOTrainer: the same
tiny Llama, the same tokenized pairs and prompts, fp32 on the CPU, the same number of torch threads.

    python -m bench.bench_vs_trl                                   # every case, ~3-5 min on a quiet 2-core CPU
    python -m bench.bench_vs_trl --cases dpo-ours,dpo-trl --dpo-steps 5 --warmup 1

The parent builds the model and the data once in a temporary directory, then runs each case in its own
subprocess (`--case NAME`, so imports and peak RSS are per case), prints markdown tables and writes all
it measured to --out. Every figure is a wall-clock measurement of this run; nothing is estimated.

"steady" throughput counts the steps after --warmup (from the end of the last warm-up step to the end of
the last step); "whole" counts every step over the wall time of the whole loop -- for TRL, of the
`trainer.train()` call itself, nothing subtracted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 384, "max_positions": 64}
PUBLIC = ["pairs", "batch_size", "dpo_steps", "prompts_per_step", "num_generations", "max_new_tokens",
          "grpo_steps", "warmup", "lr", "seed", "threads", "cases", "timeout", "out"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pairs", type=int, default=512, help="preference pairs in the DPO data (default 512)")
    p.add_argument("--batch-size", type=int, default=32, help="DPO pairs per optimizer step (default 32)")
    p.add_argument("--dpo-steps", type=int, default=250, help="timed DPO steps after the warm-up (default 250)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="GRPO prompts per step (default 4)")
    p.add_argument("--num-generations", type=int, default=8, help="GRPO completions per prompt (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest GRPO completion (default 16)")
    p.add_argument("--grpo-steps", type=int, default=80, help="timed GRPO steps after the warm-up (default 80)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps of every case (>= 1, default 3)")
    p.add_argument("--lr", type=float, default=1e-5, help="constant AdamW learning rate (default 1e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads in every case (default 2)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per case (default 900)")
    p.add_argument("--out", default="bench/results.json", help="JSON results (default bench/results.json)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1 or min(args.dpo_steps, args.grpo_steps) < 1 or args.pairs < args.batch_size:
        p.error("need --warmup >= 1, at least one timed step, and --pairs >= --batch-size")
    if unknown := set(args.cases.split(",")) - set(CASES):
        p.error(f"unknown case(s) {', '.join(sorted(unknown))}")
    return args


def cli(args) -> list[str]:
    return [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in PUBLIC]


# ---------------------------------------------------------------------------------------------- cases (children)

def setup(args):
    """Seed, flush denormals (the project's setup_torch, applied to TRL's cases too) and fix the threads."""
    import torch

    from stages.core import models

    models.setup_torch(args.seed)
    torch.set_num_threads(args.threads)
    return torch.device("cpu")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def throughput(ends: list[float], t_start: float, t_end: float, warmup: int, per_step: int) -> dict:
    """ends: time.perf_counter() at the end of each optimizer step; [t_start, t_end] the whole loop."""
    timed, steady = len(ends) - warmup, ends[-1] - ends[warmup - 1]
    return {"steps": len(ends), "timed_steps": timed, "per_step": per_step, "whole_s": t_end - t_start,
            "steady_s": steady, "whole_per_s": per_step * len(ends) / (t_end - t_start),
            "steady_per_s": per_step * timed / steady}


def dpo_ours(args, wd: Path) -> dict:
    """preference.fit's step: pair_step (one forward of the 2B sequences, dpo_loss against the stored
    reference log-probs) and the GuardedStep's update (backward, clip, AdamW), on consecutive batches of the data."""
    device = setup(args)
    from stages.core import config, data, models, train
    from stages.methods import preference
    from stages.methods.registry import REGISTRY
    from stages.pairs import ref_logps

    tok = models.load_tokenizer(str(wd / "model"))
    policy = models.load_causal_lm(str(wd / "model"), device)
    rows = data.tokenize(tok, data.normalize(read_jsonl(wd / "preference.jsonl"), "preference", "bench"), "preference")
    t = time.perf_counter()  # the pairs stage's job (stored with the pairs); the policy before step 0 is the reference
    ref = ref_logps(policy, [r["prompt_ids"] for r in rows] * 2, [r["chosen_ids"] for r in rows]
                    + [r["rejected_ids"] for r in rows], tok.pad_token_id, args.batch_size, device)
    for r, lp_c, lp_r in zip(rows, ref[:len(rows)], ref[len(rows):]):
        r["chosen_ref_logp"], r["rejected_ref_logp"] = lp_c, lp_r
    precompute_s = time.perf_counter() - t

    c = config.DPOConfig(batch_size=args.batch_size, lr=args.lr, schedule="constant")
    opt = train.make_optimizer(policy.parameters(), c)
    guard = train.GuardedStep(policy.parameters(), opt, c.max_grad_norm)
    total, n_batches, ends = args.warmup + args.dpo_steps, len(rows) // args.batch_size, []
    policy.train()
    t0 = time.perf_counter()
    for step in range(total):
        k = step % n_batches
        batch = rows[k * args.batch_size:(k + 1) * args.batch_size]
        micros = preference.pair_step(REGISTRY["dpo"], policy, batch, c, tok.pad_token_id, device)
        if step == 0:
            micros[0] = train.Micro(partial(preference.check_reference, micros[0].loss, strict=True), micros[0].share)
        guard.update(micros, train.lr_at(step, c, total))
        ends.append(time.perf_counter())
    return {**throughput(ends, t0, ends[-1], args.warmup, args.batch_size), "precompute_s": precompute_s}


def step_clock():
    """A TrainerCallback that notes the time at the end of each optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepClock()


def trl_args(args, wd: Path, name: str, steps: int) -> dict:
    return dict(
        output_dir=str(wd / f"trl-{name}"), max_steps=args.warmup + steps, learning_rate=args.lr,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, seed=args.seed,
        optim="adamw_torch",  # our torch.optim.AdamW; transformers 5 defaults to the fused kernel on torch >= 2.8
        bf16=False,  # TRL's configs default to bf16=True; both sides train in fp32
        activation_checkpointing=False,  # transformers 5 name of gradient_checkpointing, which TRL defaults to True
        use_cpu=True, report_to=[], logging_steps=10**9, save_strategy="no", eval_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True, model_init_kwargs={"dtype": "float32"},
    )


def trl_settings(trainer) -> dict:
    """What TRL actually ran with, recorded next to its figures."""
    a = trainer.args
    return {"bf16": a.bf16, "activation_checkpointing": a.activation_checkpointing, "optim": str(a.optim),
            "max_steps": a.max_steps, "per_device_train_batch_size": a.per_device_train_batch_size,
            "ref_model": getattr(trainer, "ref_model", None) is not None}


def dpo_trl(args, wd: Path, precompute: bool) -> dict:
    setup(args)
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from stages.core import data, models

    tok = models.load_tokenizer(str(wd / "model"))
    raw = read_jsonl(wd / "preference.jsonl")
    spent = {"precompute_s": 0.0}
    if precompute:  # measured, not changed: the reference pass runs inside DPOTrainer.__init__
        inner = DPOTrainer._precompute_ref_logps

        def timed(self, *a, **k):
            t = time.perf_counter()
            out = inner(self, *a, **k)
            spent["precompute_s"] += time.perf_counter() - t
            return out
        DPOTrainer._precompute_ref_logps = timed
    cfg = DPOConfig(**trl_args(args, wd, "dpo", args.dpo_steps), per_device_train_batch_size=args.batch_size,
                    beta=0.1, precompute_ref_log_probs=precompute, precompute_ref_batch_size=args.batch_size,
                    train_sampling_strategy="sequential", dataloader_drop_last=True)  # ours' batches, in order
    t = time.perf_counter()  # the policy is given by path: DPOTrainer loads its reference from the same directory
    trainer = DPOTrainer(model=str(wd / "model"), args=cfg, train_dataset=Dataset.from_list(raw), processing_class=tok)
    init_s = time.perf_counter() - t
    ours = data.tokenize(tok, data.normalize(raw, "preference", "bench"), "preference")
    cols = ("prompt_ids", "chosen_ids", "rejected_ids")
    same = [[r[c] for c in cols] for r in ours] == [[r[c] for c in cols] for r in trainer.train_dataset]
    clock = step_clock()
    trainer.add_callback(clock)
    t0 = time.perf_counter()
    out = trainer.train()
    t1 = time.perf_counter()
    return {**throughput(clock.ends, t0, t1, args.warmup, args.batch_size), "init_s": init_s,
            "precompute_s": spent["precompute_s"] if precompute else None,
            "trl_train_runtime_s": out.metrics["train_runtime"], "same_tokens_as_ours": same,
            "trl_settings": trl_settings(trainer)}


def grpo_ours(args, wd: Path) -> dict:
    """online.fit's GRPO step with minibatches = num_iterations = 1: collect (sample with the KV cache, decode,
    verifier), group advantages, one forward with entropy, grpo_loss, GuardedStep. beta = 0: no reference."""
    device = setup(args)
    import torch

    from stages.core import advantages, config, data, models, train
    from stages.core.logprobs import token_logps
    from stages.methods import online

    tok = models.load_tokenizer(str(wd / "model"))
    policy = models.load_causal_lm(str(wd / "model"), device)
    rows = data.tokenize(tok, data.normalize(read_jsonl(wd / "prompts.jsonl"), "prompts", "bench"), "prompts")
    c = config.GRPOConfig(prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
                          max_new_tokens=args.max_new_tokens, temperature=1.0, beta=0.0, lr=args.lr,
                          schedule="constant")
    opt = train.make_optimizer(policy.parameters(), c)
    guard = train.GuardedStep(policy.parameters(), opt, c.max_grad_norm)
    total, p, ends, gen_s, tokens = args.warmup + args.grpo_steps, args.prompts_per_step, [], [], []
    t0 = time.perf_counter()
    for step in range(total):
        b = online.collect(policy, None, None, tok, rows[step * p:(step + 1) * p], c, step + args.seed * 100_003,
                           device, need_old=False)
        adv = advantages.group_advantages(b.scores.total, c.num_generations, c.scale_rewards).to(b.mask.device)
        idx = torch.arange(len(b.seqs), device=device)
        policy.train()
        with models.autocast(device):
            logps, entropy = token_logps(policy, b.seqs.select(idx), c.temperature, with_entropy=True)
        online.sampler_gap(logps, b, idx, strict=True)
        loss, stats = online.grpo_loss(logps.float(), b, idx, adv, c, float(b.mask.sum()))
        guard(loss, train.lr_at(step, c, total))
        online.rollout_metrics(b, c.num_generations)
        ends.append(time.perf_counter())
        gen_s.append(b.gen_seconds)
        tokens.append(b.n_tokens)
    res = throughput(ends, t0, ends[-1], args.warmup, p * args.num_generations)
    return {**res, "gen_share": sum(gen_s[args.warmup:]) / res["steady_s"], "tokens": sum(tokens[args.warmup:])}


def grpo_trl(args, wd: Path) -> dict:
    setup(args)
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from stages.core import data, models, rewards

    def verifier(completions, answer, **kwargs):  # TRL passes the dataset's extra columns as keyword arguments
        return [rewards.verify(c[-1]["content"], a) for c, a in zip(completions, answer)]

    tok = models.load_tokenizer(str(wd / "model"))
    raw = read_jsonl(wd / "prompts.jsonl")
    k, p = args.num_generations, args.prompts_per_step
    # One generation batch per optimizer step: per_device_train_batch_size completions (steps_per_generation
    # defaults to gradient_accumulation_steps = 1). shuffle_dataset=False: ours' prompts, in order.
    cfg = GRPOConfig(**trl_args(args, wd, "grpo", args.grpo_steps), per_device_train_batch_size=p * k,
                     gradient_accumulation_steps=1, num_generations=k, max_completion_length=args.max_new_tokens,
                     temperature=1.0, beta=0.0, shuffle_dataset=False)
    t = time.perf_counter()
    trainer = GRPOTrainer(model=str(wd / "model"), reward_funcs=verifier, args=cfg,
                          train_dataset=Dataset.from_list(raw), processing_class=tok)
    init_s = time.perf_counter() - t
    gens = []  # (step, seconds, completion tokens, prompt ids): measured around TRL's own generate call
    inner = trainer._generate_single_turn

    def timed(prompt_ids, *a, **kw):
        t = time.perf_counter()
        ids, logprobs = inner(prompt_ids, *a, **kw)
        step, seconds = trainer.state.global_step, time.perf_counter() - t
        gens.append((step, seconds, sum(map(len, ids)), [list(x) for x in prompt_ids]))
        return ids, logprobs
    trainer._generate_single_turn = timed
    clock = step_clock()
    trainer.add_callback(clock)
    t0 = time.perf_counter()
    out = trainer.train()
    t1 = time.perf_counter()
    ours = data.encode_prompts(tok, [r["prompt"] for r in raw])
    same = all(ids == [x for x in ours[s * p:(s + 1) * p] for _ in range(k)] for s, _, _, ids in gens)
    timed_gens = [g for g in gens if g[0] >= args.warmup]
    res = throughput(clock.ends, t0, t1, args.warmup, p * k)
    return {**res, "init_s": init_s, "gen_share": sum(g[1] for g in timed_gens) / res["steady_s"],
            "tokens": sum(g[2] for g in timed_gens), "trl_train_runtime_s": out.metrics["train_runtime"],
            "same_tokens_as_ours": same, "trl_settings": trl_settings(trainer)}


CASES = {
    "dpo-ours": dpo_ours,
    "dpo-trl": lambda args, wd: dpo_trl(args, wd, precompute=False),
    "dpo-trl-precompute": lambda args, wd: dpo_trl(args, wd, precompute=True),
    "grpo-ours": grpo_ours,
    "grpo-trl": grpo_trl,
}


# ---------------------------------------------------------------------------------------------- parent

def prepare(args, wd: Path) -> dict:
    """The shared inputs: the embedded tokenizer and tiny Llama saved with save_pretrained, and the data."""
    setup(args)
    from stages.core import models, task

    tok = models.build_tokenizer(task.corpus(50), 300)
    model = models.build_tiny_llama(tok, **MODEL, seed=args.seed)
    model.save_pretrained(wd / "model")
    tok.save_pretrained(wd / "model")
    sets = task.make_datasets(max_operand=50, n_sft=1, carry_slip=0.6, sft_noise=0.05, n_preference=args.pairs,
                              carry_pairs=0.7, n_prompts=args.prompts_per_step * (args.warmup + args.grpo_steps),
                              n_eval=300, seed=args.seed)
    for name, kind in (("preference.jsonl", "preference"), ("prompts.jsonl", "prompts")):
        (wd / name).write_text("".join(json.dumps(r) + "\n" for r in sets[kind]))
    return {"params": models.n_params(model), **MODEL, "vocab_size": len(tok)}


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes on the machine spent busy, CPU seconds of this process's finished children)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), children.ru_utime + children.ru_stime


def run_case(args, case: str, wd: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_DATASETS_CACHE": str(wd / "hf-datasets")}
    cmd = [sys.executable, "-m", "bench.bench_vs_trl", *cli(args), f"--case={case}", f"--workdir={wd}"]
    (busy, mine), t = cpu_seconds(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        log, failed = proc.stdout + proc.stderr, proc.returncode != 0
    except subprocess.TimeoutExpired as e:
        log, failed = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {args.timeout} s", True
    wall, (busy2, mine2) = time.perf_counter() - t, cpu_seconds()
    # CPU the rest of the machine used while this case ran: a quiet machine gives ~0
    info = {"case": case, "process_s": wall, "others_cpu_share": max(0.0, (busy2 - busy) - (mine2 - mine)) / (
        wall * os.cpu_count())}
    if failed or not (wd / f"{case}.json").exists():
        print(f"  {case}: FAILED\n" + "\n".join("    " + line for line in log.strip().splitlines()[-25:]))
        return {**info, "error": log.strip().splitlines()[-1] if log.strip() else "no output"}
    return {**info, **json.loads((wd / f"{case}.json").read_text())}


def fmt(v, digits=1) -> str:
    return "–" if v is None else (("yes" if v else "NO") if isinstance(v, bool) else f"{v:.{digits}f}")


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    if not rows:
        return
    print(f"\n### {title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def report(args, results: dict) -> None:
    ok = {c: r for c, r in results.items() if "error" not in r}
    common = lambda r: [fmt(r.get("trl_train_runtime_s"), 2), fmt(r.get("same_tokens_as_ours")),
                        fmt(r["peak_rss_mb"], 0)]
    table(f"DPO: pairs/s, {args.batch_size} pairs a step, {args.dpo_steps} timed steps after {args.warmup} warm-up",
          ["case", "steady pairs/s", "whole-run pairs/s", "ref. precompute s", "pairs/s incl. precompute",
           "TRL train_runtime s", "same tokens", "peak RSS MB"],
          [[c, fmt(r["steady_per_s"]), fmt(r["whole_per_s"]), fmt(r["precompute_s"], 2),
            fmt(r["per_step"] * r["steps"] / (r["whole_s"] + (r["precompute_s"] or 0.0))), *common(r)]
           for c, r in ok.items() if c.startswith("dpo")])
    n = args.prompts_per_step * args.num_generations
    table(f"GRPO: completions/s, {n} a step ({args.prompts_per_step} prompts x {args.num_generations}), "
          f"{args.grpo_steps} timed steps after {args.warmup} warm-up",
          ["case", "steady completions/s", "whole-run completions/s", "generation share", "tokens generated",
           "mean length", "TRL train_runtime s", "same prompts", "peak RSS MB"],
          [[c, fmt(r["steady_per_s"]), fmt(r["whole_per_s"]), f"{100 * r['gen_share']:.0f}%", str(r["tokens"]),
            fmt(r["tokens"] / (r["timed_steps"] * n), 2), *common(r)] for c, r in ok.items() if c.startswith("grpo")])
    print()
    for ours, theirs in (("dpo-ours", "dpo-trl"), ("dpo-ours", "dpo-trl-precompute"), ("grpo-ours", "grpo-trl")):
        if ours in ok and theirs in ok:
            print(f"{ours} vs {theirs}: {ok[ours]['steady_per_s'] / ok[theirs]['steady_per_s']:.2f}x steady, "
                  f"{ok[ours]['whole_per_s'] / ok[theirs]['whole_per_s']:.2f}x whole-run")
    busy = [f"{c} {100 * r['others_cpu_share']:.0f}%" for c, r in results.items() if r["others_cpu_share"] > 0.05]
    if busy:
        print(f"note: other processes used this share of the machine's CPU while a case ran: {', '.join(busy)}; "
              "its figures are not those of a quiet machine")


def installed(module: str) -> str | None:
    try:
        return version(module)
    except PackageNotFoundError:
        return None


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.case:  # a child: one case, its result next to the shared inputs
        result = CASES[args.case](args, Path(args.workdir))
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        result["torch_threads_at_end"] = __import__("torch").get_num_threads()  # nothing changed them on the way
        (Path(args.workdir) / f"{args.case}.json").write_text(json.dumps(result))
        return
    print(f"reproduce: cd {ROOT} && {sys.executable} -m bench.bench_vs_trl {' '.join(cli(args))}\n", flush=True)
    os.environ.setdefault("TQDM_DISABLE", "1")  # also inherited by the cases
    meta = {"argv": sys.argv[1:], "args": {k: getattr(args, k) for k in PUBLIC}, "cpus": len(os.sched_getaffinity(0)),
            "versions": {m: installed(m) for m in ("torch", "transformers", "trl", "accelerate", "datasets")},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        wd = Path(tmp)
        meta["model"] = prepare(args, wd)
        print(f"tiny Llama: {meta['model']['params'] / 1e6:.2f}M params; {args.threads} torch threads, fp32, CPU")
        for case in args.cases.split(","):
            print(f"  running {case} ...", flush=True)
            results[case] = run_case(args, case, wd)
    report(args, results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
