"""prepare: the datasets, the tokenizer (with a chat template) and the base model.

    python -m stages.prepare --data-out data --model-out models/base

Embedded default (no network): the synthetic addition task from `seed`, a BPE tokenizer trained with
`tokenizers`, a tiny Llama from a config. Otherwise: datasets from local files/dirs or the HF cache
(TRL column conventions), and any causal LM by local dir or cached hub id. Every row is validated
before anything is written; both outputs appear atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from stages.core import config, data, io, models, rewards, stage, task, tracking

KINDS = {"sft": "sft", "preference": "preference", "prompts": "prompts", "eval": "prompts"}


def load_sets(cfg: config.Params) -> dict[str, list[dict]]:
    """Every dataset, validated; embedded ones generated from the seed."""
    d = cfg.data
    sources = {name: getattr(d, name) for name in KINDS}
    embedded = None
    if "embedded" in sources.values():
        e = d.embedded
        embedded = task.TASKS[e.task](e.max_operand, e.n_sft, e.carry_slip, e.sft_noise, e.n_preference,
                                      e.carry_pairs, e.n_prompts, e.n_eval, cfg.seed, e.terms)
    sets = {}
    for name, source in sources.items():
        if source == "embedded":
            rows, where = embedded[name], f"data.{name} (embedded)"
        else:
            rows, where = data.load_rows(source, f"data.{name}"), f"data.{name}: {source}"
        sets[name] = data.normalize(rows, KINDS[name], where, d.answer_column)
    return sets


def build_model(cfg: config.Params):
    """(tokenizer, model, description) — embedded tiny Llama, a .gguf file, or a local / cached hub model."""
    m = cfg.model
    if m.name_or_path == "embedded":
        e = m.embedded
        tok = models.build_tokenizer(task.corpus(cfg.data.embedded.max_operand, cfg.data.embedded.task), e.vocab_size)
        model = models.build_tiny_llama(tok, e.hidden_size, e.num_layers, e.num_heads, e.intermediate_size,
                                        e.max_positions, cfg.seed)
        return tok, model, "embedded tiny Llama"
    tok, model = models.load_pretrained(m.name_or_path, "model.name_or_path")
    if m.chat_template:
        path = Path(m.chat_template).expanduser()
        tok.chat_template = path.read_text() if path.is_file() else m.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, model, m.name_or_path


def save_dtype(cfg: config.Params) -> torch.dtype:
    """model.dtype, auto = float32 for the embedded model (its measured bars are fp32), bfloat16 otherwise."""
    if cfg.model.dtype == "auto":
        return torch.float32 if cfg.model.name_or_path == "embedded" else torch.bfloat16
    return models.DTYPES[cfg.model.dtype]


def check_chat_template(tok, sets: dict[str, list[dict]], name_or_path: str) -> None:
    """Conversational data needs a chat template; say what to set when the model has none."""
    chat = any(not isinstance(rows[0]["prompt"], str) for rows in sets.values())
    if chat and not tok.chat_template:
        raise config.ConfigError(f"model.name_or_path: {name_or_path} has no chat template, but the data is "
                                 "conversational; set model.chat_template to a Jinja template (or a file holding "
                                 "one), or give plain-text prompt/completion data")


def check_lengths(sets: dict[str, list[dict]], max_positions: int | None) -> None:
    """Every tokenized example must fit the model; the error names the set, row and column."""
    for name, rows in sets.items():
        for i, row in enumerate(rows, start=1):
            for col in ("completion", "chosen", "rejected"):
                n = len(row["prompt_ids"]) + len(row.get(f"{col}_ids", []))
                if max_positions and n > max_positions:
                    what = f"{col} with its prompt" if f"{col}_ids" in row else "the prompt"
                    raise config.ConfigError(f"data.{name}: row {i}: {what} is {n} tokens, more than the model's "
                                             f"{max_positions} positions")


def check_answers(cfg: config.Params, sets: dict[str, list[dict]]) -> None:
    """The reference answers, checked here rather than stages later: readable by the verifier, and present
    in the prompts when a stage that reads them scores with the verifier (else it would find no reward
    after SFT and the reward model have trained)."""
    for name in ("prompts", "eval"):
        source = getattr(cfg.data, name)
        rewards.check_references(sets[name], cfg.verifier, f"data.{name}: {source}")
    users = ["pairs.score.verifier"] if cfg.pairs.score.verifier > 0 else []
    for m in cfg.align.running():
        reward = getattr(cfg.align.method(m), "reward", None)
        if reward is not None and reward.verifier > 0:
            users.append(f"align.{m}.reward.verifier")
    if users and not any(r.get("answer") is not None for r in sets["prompts"]):
        raise config.ConfigError(f"data.prompts: {cfg.data.prompts}: no row has a reference answer (column "
                                 f"{cfg.data.answer_column!r}, data.answer_column), which the verifier needs "
                                 f"({', '.join(users)} > 0); give the answers or set those weights to 0")


def small_sets(cfg: config.Params, sets: dict[str, list[dict]]) -> list[str]:
    """A word on each set smaller than one batch of the stage that trains on it: legal (every step then
    sees the whole set), but more often a wrong file than a choice."""
    readers = {"sft": ("sft", cfg.sft.batch_size), "preference": ("reward", cfg.reward.batch_size)}
    return [f"warning: data.{name}: {len(sets[name])} rows, fewer than {stage}.batch_size {size}: every "
            f"{stage} step trains on all of them ({getattr(cfg, stage).steps} steps)"
            for name, (stage, size) in readers.items() if len(sets[name]) < size]


def main(argv=None) -> str:
    p = stage.parser(__doc__, "--data-out", "--model-out")
    args = p.parse_args(argv)
    cfg = config.load(args.params)
    d = cfg.data
    sets = load_sets(cfg)
    check_answers(cfg, sets)
    for line in small_sets(cfg, sets):
        print(line, file=sys.stderr)
    tok, model, what = build_model(cfg)
    check_chat_template(tok, sets, cfg.model.name_or_path)
    stop = models.generation_stop_ids(tok, getattr(model.generation_config, "eos_token_id", None))
    truncated = {"prompts": 0, "completions": 0}
    for name, rows in sets.items():
        rows = data.tokenize(tok, rows, KINDS[name], stop)
        sets[name], counts = data.limit_lengths(rows, KINDS[name], d.max_prompt_length, d.max_completion_length,
                                                d.overlong, f"data.{name}")
        truncated = {k: truncated[k] + counts[k] for k in truncated}
    check_lengths(sets, getattr(model.config, "max_position_embeddings", None))

    with tracking.stage_run("prepare", params={"seed": cfg.seed, **cfg.model_dump(include={"model", "data"})}) as tr:
        with io.atomic_dir(args.data_out) as tmp:
            for name, rows in sets.items():
                io.write_jsonl(tmp / f"{name}.jsonl", rows)
        with io.atomic_dir(args.model_out) as tmp:
            models.save(model, tok, tmp, save_dtype(cfg))
        counts = {f"data/n_{k}": len(v) for k, v in sets.items()}
        tr.log_metrics({**counts, "model/n_params": models.n_params(model),
                        "data/truncated_prompts": truncated["prompts"],
                        "data/truncated_completions": truncated["completions"]})
    sizes = ", ".join(f"{k} {len(v)}" for k, v in sets.items())
    cut = f"; truncated {truncated['prompts']} prompts, {truncated['completions']} completions" if any(
        truncated.values()) else ""
    return (f"prepare: {what} ({models.n_params(model) / 1e6:.2f}M params, vocab {len(tok)}, saved as "
            f"{str(save_dtype(cfg)).removeprefix('torch.')}); rows: {sizes}{cut}")


if __name__ == "__main__":
    stage.run(main)
