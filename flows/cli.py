"""alignpipe: the pipeline's command (installed by `pip install -e .`; the make targets call it).

    alignpipe run [--methods dpo grpo] [--set align.dpo.beta=0.05] [--pool gpu]
    alignpipe repro [dvc repro options]
    alignpipe compare [--show]
    alignpipe study [--seeds 0 1 2 3] [--methods all] [--levels terms-3]
    alignpipe real | workers | deploy | ui
    alignpipe params [KEY]
    alignpipe doctor

`alignpipe <command> --help` explains each. A mistake in params or options is one line on stderr and
exit 2, before any work; a stage that fails is one line and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

DELEGATED = {  # command → (module whose main(argv) it runs, what it does)
    "run": ("flows.pipeline", "the whole pipeline on params.yaml as a Prefect flow; DVC reruns only what is stale"),
    "repro": ("flows.repro", "dvc repro, after params.yaml and what it names are checked (options go to dvc)"),
    "study": ("flows.study", "methods over seeds and difficulty levels: intervals, paired tests, claims tested"),
    "real": ("flows.real", "the whole chain on a real chat model (SmolLM2-135M-Instruct) in .real/"),
    "workers": ("flows.cluster", "the smoke pipeline across two Prefect workers on this machine, in .workers/"),
    "deploy": ("flows.deploy", "serve the pipeline as a Prefect deployment (a schedule, a pool for its stages)"),
}
OWN = {
    "compare": "every method on the same upstream artifacts, GRPO distilled too; --show prints the last table",
    "ui": "the MLflow UI (port 5000) and the Prefect server and UI (port 4200), until Ctrl-C",
    "params": "what a param means: its type, range, default and the value params.yaml gives it",
    "doctor": "what this machine has for each part of the pipeline, and what to do where something is missing",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {**{k: v[1] for k, v in DELEGATED.items()}, **OWN}
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, commands))
        print(__doc__.split("\n\n")[0].strip() + "\n\ncommands:")
        print("\n".join(f"  {name:<{width}}  {what}" for name, what in commands.items()))
        print("\n" + __doc__.split("\n\n")[-1].strip())
        return
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"error: unknown command {name!r} (commands: {', '.join(commands)})", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"alignpipe {name}", *rest]  # argparse's usage line names the command
    if name in DELEGATED:
        importlib.import_module(DELEGATED[name][0]).main(rest)
    else:
        globals()[name](rest)


def compare(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="alignpipe compare", description=OWN["compare"] + ". Sets align.methods "
                                "and align.distill.teachers in params.yaml, then runs the pipeline (`alignpipe run`).")
    p.add_argument("--show", action="store_true", help="print the last comparison (reports/comparison.md), run nothing")
    p.add_argument("--repo", default=".")
    p.add_argument("--pool", help="run each stage on this Prefect work pool's workers")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param (repeatable)")
    args = p.parse_args(argv)
    if args.show:
        table = Path(args.repo) / "reports" / "comparison.md"
        if not table.exists():
            print(f"error: {table}: no comparison yet (alignpipe run or alignpipe compare makes it)", file=sys.stderr)
            sys.exit(2)
        print(table.read_text(), end="")
        return
    from flows import pipeline
    from stages.core import config

    every = config.policy_params(config.every_policy())
    teachers = f"align.distill.teachers=[{', '.join(every['distill']['teachers'])}]"
    pipeline.main(["--repo", args.repo, "--methods", *every["methods"], "--set", teachers,
                   *(["--pool", args.pool] if args.pool else []), *(x for o in args.overrides for x in ("--set", o))])


def ui(argv: list[str]) -> None:
    import subprocess

    argparse.ArgumentParser(prog="alignpipe ui", description=OWN["ui"] + " (the MLflow store: ./mlflow.db).")\
        .parse_args(argv)
    bin_dir = Path(sys.executable).parent
    mlflow = subprocess.Popen([str(bin_dir / "mlflow"), "ui", "--backend-store-uri",
                               f"sqlite:///{Path.cwd() / 'mlflow.db'}", "--port", "5000"])
    try:
        subprocess.run([str(bin_dir / "prefect"), "server", "start", "--port", "4200"])
    except KeyboardInterrupt:
        pass
    finally:
        mlflow.terminate()


def params(argv: list[str]) -> None:
    from flows import params as params_edit
    from stages.core import config

    p = argparse.ArgumentParser(prog="alignpipe params", description=OWN["params"] + ". With no KEY, the sections.")
    p.add_argument("key", nargs="?", help="a param or a section, dotted: align.dpo.beta, sft, evaluate.pass_k")
    p.add_argument("--params", default="params.yaml", help="the params file whose values to show")
    args = p.parse_args(argv)
    try:
        current = config.load(args.params) if Path(args.params).exists() else None
        print(params_edit.describe(args.key or "", current), end="")
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def doctor(argv: list[str]) -> None:
    from flows import doctor as checks

    argparse.ArgumentParser(prog="alignpipe doctor", description=OWN["doctor"] + ".").parse_args(argv)
    print(checks.report(Path.cwd()), end="")


if __name__ == "__main__":
    main()
