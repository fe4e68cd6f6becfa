"""teacher: a model from outside the pipeline, brought in as a teacher for on-policy distillation.

    python -m stages.teacher NAME --base models/base --out models/NAME

NAME is a key of `align.distill.external` (a model directory, a .gguf file or a hub id in the local Hugging
Face cache). The model is checked (its tokenizer loads, its weights are finite, its vocabulary is the pipeline's:
it scores the student's tokens) and saved into models/NAME in float32 (lossless whatever the source's dtype),
where distill@NAME reads it and DVC versions it with the run. It depends on inputs.lock.json, where `check`
records the source's digest (a hub id: its cached revision), so a changed source reruns it; unchanged bytes
leave models/NAME as it was, and nothing downstream reruns.
"""

from __future__ import annotations

from stages.core import config, io, models, stage


def main(argv=None) -> str:
    p = stage.parser(__doc__, "--base", "--out")
    p.add_argument("name", help="a key of align.distill.external")
    args = p.parse_args(argv)
    external = config.load(args.params).align.distill.external
    if args.name not in external:
        raise config.ConfigError(f"align.distill.external: no teacher named {args.name!r} "
                                 f"(names: {', '.join(external) or 'none'})")
    field, source = f"align.distill.external.{args.name}", external[args.name]
    tok, model = models.load_pretrained(source, field)
    if tok.get_vocab() != models.load_tokenizer(args.base).get_vocab():
        raise config.ConfigError(f"{field}: {source}: its tokenizer differs from the pipeline's ({args.base}); a "
                                 "teacher scores the student's tokens, so both need one vocabulary")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with io.atomic_dir(args.out) as tmp:
        models.save(model, tok, tmp)
    return f"teacher@{args.name}: {source} ({models.n_params(model) / 1e6:.2f}M params) → {args.out}"


if __name__ == "__main__":
    stage.run(main)
