"""The `alignpipe` command: every subcommand explains itself, a mistake is one line and exit 2, `params`
reads the meaning of a param from the schema and `doctor` reports what this machine has, found the way the
stages find it."""

import subprocess
import sys
from pathlib import Path

import pytest

from flows import cli, doctor
from flows import params as params_edit
from stages.core import config
from tests import helpers

COMMAND = Path(sys.executable).parent / "alignpipe"  # the console script `pip install -e .` made


def test_the_installed_command_lists_every_subcommand():
    out = subprocess.run([str(COMMAND), "--help"], capture_output=True, text=True, env=helpers.env())
    assert out.returncode == 0, out.stderr
    for name in [*cli.DELEGATED, *cli.OWN]:
        assert f"\n  {name} " in out.stdout
    repro = subprocess.run([str(COMMAND), "repro", "--help"], capture_output=True, text=True, env=helpers.env())
    assert repro.returncode == 0 and repro.stdout.startswith("`dvc repro`, after what the flow does")
    assert "usage: dvc repro" in repro.stdout  # then DVC's own options


@pytest.mark.parametrize("name", [n for n in [*cli.DELEGATED, *cli.OWN] if n != "repro"])
def test_every_subcommand_has_its_help(name, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["alignpipe"])
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: alignpipe {name}")


def test_a_mistake_is_one_line_and_exit_2(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["alignpipe"])
    for argv in (["fly"], ["params", "align.dpo.betta"], ["compare", "--show", "--repo", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)


def test_compare_show_prints_the_last_table(capsys, monkeypatch, tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "comparison.md").write_text("| policy | accuracy |\n| sft | 50.0% |\n")
    cli.main(["compare", "--show", "--repo", str(tmp_path)])
    assert capsys.readouterr().out == "| policy | accuracy |\n| sft | 50.0% |\n"


def test_params_gives_a_params_meaning_from_the_schema():
    cfg = config.load(str(helpers.SMOKE))
    text = params_edit.describe("align.dpo.beta", cfg)
    assert text.startswith("align.dpo.beta: float, > 0.0\n  default: 0.1\n  params.yaml: 0.1\n")
    assert config.DPOConfig.model_fields["beta"].description in text
    section = params_edit.describe("evaluate", cfg)
    assert all(f"\n  {name} " in section for name in config.EvaluateConfig.model_fields)
    assert "pass_n                 int = 16  (params.yaml: 4)" in section  # the smoke profile's own value
    top = params_edit.describe("")
    assert all(f"\n  {name}" in top for name in config.Params.model_fields)
    with pytest.raises(config.ConfigError, match=r"^align.dpo.betta: no such param \(align.dpo has: "):
        params_edit.describe("align.dpo.betta")


def test_doctor_reports_this_machine(tmp_path, monkeypatch):
    import torch

    from stages.core import models, sandbox

    monkeypatch.delenv("ALIGNPIPE_PROCESSES", raising=False)
    monkeypatch.delenv("ALIGNPIPE_TRACKING", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no accelerate config
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    from flows import workspace

    d = workspace.create(tmp_path / "ws", helpers.SMOKE)
    lines = {line[3:14].strip(): line for line in doctor.report(d).splitlines()[2:]}
    assert lines["params"].startswith("ok params      params.yaml is valid: model embedded, methods dpo")
    assert ("CUDA" in lines["device"]) == torch.cuda.is_available()
    assert ("bf16 autocast" in lines["precision"]) == (torch.cuda.is_available() or models.cpu_has_fast_bf16())
    assert "1 per stage (no accelerate config)" in lines["processes"]
    assert sandbox.isolation().describe() in lines["sandbox"]
    assert lines["dvc"].startswith("-- dvc         no default remote: everything runs here")
    assert lines["mlflow"].startswith("!! mlflow      tracking server http://127.0.0.1:9 does not answer")
    helpers.dvc("remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=d)
    assert "ok dvc         remote store: stages can run on workers" in doctor.report(d), doctor.report(d)
