"""prepare: the datasets, the tokenizer (with a chat template) and the base model.

    python -m stages.prepare --data-out data --model-out models/base

Embedded default (no network): the synthetic addition task from `seed`, a BPE tokenizer trained with
`tokenizers`, a tiny Llama from a config. Otherwise: datasets from local files/dirs or the HF cache
(TRL column conventions), and any causal LM by local dir or cached hub id. Every row is validated
before anything is written; both outputs appear atomically.
"""

from __future__ import annotations

from stages.core import config, data, io, models, stage, task, tracking

KINDS = {"sft": "sft", "preference": "preference", "prompts": "prompts", "eval": "prompts"}


def load_sets(cfg: config.Params) -> dict[str, list[dict]]:
    """Every dataset, validated; embedded ones generated from the seed."""
    d = cfg.data
    sources = {name: getattr(d, name) for name in KINDS}
    embedded = None
    if "embedded" in sources.values():
        e = d.embedded
        embedded = task.make_datasets(e.max_operand, e.n_sft, e.carry_slip, e.sft_noise, e.n_preference,
                                      e.carry_pairs, e.n_prompts, e.n_eval, cfg.seed)
    sets = {}
    for name, source in sources.items():
        if source == "embedded":
            rows, where = embedded[name], f"data.{name} (embedded)"
        else:
            rows, where = data.load_rows(source, f"data.{name}"), f"data.{name}: {source}"
        sets[name] = data.normalize(rows, KINDS[name], where, d.answer_column)
    return sets


def build_model(cfg: config.Params):
    """(tokenizer, model, description) — embedded tiny Llama, or a local / cached hub model."""
    m = cfg.model
    if m.name_or_path == "embedded":
        e = m.embedded
        tok = models.build_tokenizer(task.corpus(cfg.data.embedded.max_operand), e.vocab_size)
        model = models.build_tiny_llama(tok, e.hidden_size, e.num_layers, e.num_heads, e.intermediate_size,
                                        e.max_positions, cfg.seed)
        return tok, model, "embedded tiny Llama"
    models.check_model_path(m.name_or_path, "model.name_or_path")
    try:
        tok = models.load_tokenizer(m.name_or_path)
        model = models.load_causal_lm(m.name_or_path, "cpu")
    except OSError as e:
        raise config.ConfigError(f"model.name_or_path: could not load {m.name_or_path!r} from a local directory "
                                 f"or the Hugging Face cache ({str(e).splitlines()[0]})") from None
    return tok, model, m.name_or_path


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


def main(argv=None) -> str:
    p = stage.parser(__doc__, "--data-out", "--model-out")
    args = p.parse_args(argv)
    cfg = config.load(args.params)
    sets = load_sets(cfg)
    tok, model, what = build_model(cfg)
    sets = {name: data.tokenize(tok, rows, KINDS[name]) for name, rows in sets.items()}
    check_lengths(sets, getattr(model.config, "max_position_embeddings", None))

    with tracking.stage_run("prepare", params={"seed": cfg.seed, **cfg.model_dump(include={"model", "data"})}) as tr:
        with io.atomic_dir(args.data_out) as tmp:
            for name, rows in sets.items():
                io.write_jsonl(tmp / f"{name}.jsonl", rows)
        with io.atomic_dir(args.model_out) as tmp:
            tok.save_pretrained(tmp)
            model.save_pretrained(tmp)
        counts = {f"data/n_{k}": len(v) for k, v in sets.items()}
        tr.log_metrics({**counts, "model/n_params": models.n_params(model)})
    sizes = ", ".join(f"{k} {len(v)}" for k, v in sets.items())
    return f"prepare: {what} ({models.n_params(model) / 1e6:.2f}M params, vocab {len(tok)}); rows: {sizes}"


if __name__ == "__main__":
    stage.run(main)
