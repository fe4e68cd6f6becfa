"""Stage entry points on the tiny model: the non-embedded input path, bad input, resume, the reward gate.
(The happy path of every stage through DVC is in test_integration_dvc.py.)"""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests import helpers

pytestmark = pytest.mark.smoke


def smoke_params(path, **sections):
    """params.smoke.yaml with some sections updated."""
    p = yaml.safe_load(helpers.SMOKE.read_text())
    for key, value in sections.items():
        node = p
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    path.write_text(yaml.safe_dump(p))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("prepared")
    shutil.copy(helpers.SMOKE, d / "params.yaml")
    out = helpers.stage("prepare", "--data-out", "data", "--model-out", "models/base", cwd=d)
    assert out.stdout.strip().splitlines()[-1].startswith("prepare: embedded tiny Llama")
    return d


def conv(role, text):
    return [{"role": role, "content": text}]


def test_prepare_from_local_files_and_model_dir(tmp_path, saved_model):
    rows = {
        "sft": [{"messages": conv("user", "1+2=") + conv("assistant", "3")}],
        "preference": [{"prompt": conv("user", "1+2="), "chosen": conv("assistant", "3"),
                        "rejected": conv("assistant", "4")}],
        "prompts": [{"prompt": conv("user", "2+2="), "answer": "4"}],
        "eval": [{"prompt": conv("user", "3+3="), "answer": "6"}],
    }
    for name, rs in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    smoke_params(tmp_path / "params.yaml", **{"model.name_or_path": str(saved_model),
                                             **{f"data.{k}": str(tmp_path / f"{k}.jsonl") for k in rows}})
    out = helpers.stage("prepare", "--data-out", "data", "--model-out", "models/base", cwd=tmp_path)
    assert str(saved_model) in out.stdout
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: data.sft: 1 rows, fewer than sft.batch_size 16: every sft step trains on all of "
                        "them (30 steps)", "warning: data.preference: 1 rows, fewer than reward.batch_size 16: every "
                        "reward step trains on all of them (20 steps)"]  # legal, but said
    sft = [json.loads(line) for line in (tmp_path / "data" / "sft.jsonl").read_text().splitlines()]
    assert sft[0]["completion"] == conv("assistant", "3") and sft[0]["completion_ids"]
    assert (tmp_path / "models" / "base" / "config.json").exists()


@pytest.mark.parametrize("change, message", [
    ({"sft.lrr": 0.1}, "error: params.yaml: sft.lrr: unknown key"),
    ({"align.methods": ["dpo", "nope"]}, "error: params.yaml: align.methods: unknown method 'nope'"),
    ({"reward.min_accuracy": "high"}, "error: params.yaml: reward.min_accuracy: Input should be a valid number"),
    ({"model.name_or_path": "./no/such/model"},
     "error: model.name_or_path: model path './no/such/model' does not exist"),
    ({"data.sft": "missing.jsonl"}, "error: data.sft: missing.jsonl: no such file or directory"),
    ({"data.prompts": "prompts.jsonl"}, "error: data.prompts: prompts.jsonl: no row has a reference answer "
                                        "(column 'answer', data.answer_column), which the verifier needs"),
    ({"model.name_or_path": "broken"},
     "error: model.name_or_path: broken: could not load the model (SafetensorError: "),
    ({"model.name_or_path": "no_tokenizer"},
     "error: model.name_or_path: could not load a tokenizer from 'no_tokenizer'"),
])
def test_prepare_rejects_bad_params_before_writing(tmp_path, saved_model, change, message):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+2="}\n' * 4)  # no answer column
    shutil.copytree(saved_model, tmp_path / "broken")
    weights = tmp_path / "broken" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # a copy cut short
    shutil.copytree(saved_model, tmp_path / "no_tokenizer")
    for f in (tmp_path / "no_tokenizer").glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            f.unlink()
    smoke_params(tmp_path / "params.yaml", **change)
    out = helpers.stage("prepare", "--data-out", "data", "--model-out", "models/base", cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().startswith(message), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()


@pytest.mark.parametrize("kind, bad_row, message", [
    ("sft", {"prompt": "1+2="}, "row 2: missing column 'completion'"),
    ("sft", {"prompt": "1+2=", "completion": ""}, "row 2: empty completion"),
    ("preference", {"prompt": "1+2=", "chosen": "3", "rejected": "3"}, "row 2: chosen equals rejected"),
])
def test_prepare_names_the_bad_file_and_row(tmp_path, kind, bad_row, message):
    good = {"sft": {"prompt": "1+1=", "completion": "2"},
            "preference": {"prompt": "1+1=", "chosen": "2", "rejected": "3"}}[kind]
    f = tmp_path / f"{kind}.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(bad_row) + "\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "keep.txt").write_text("the user's file")
    smoke_params(tmp_path / "params.yaml", **{f"data.{kind}": str(f)})
    out = helpers.stage("prepare", "--data-out", "data", "--model-out", "models/base", cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: data.{kind}: {f}: {message}"
    assert not (tmp_path / "data").exists() and not (tmp_path / "models" / "base").exists()
    assert (tmp_path / "models" / "keep.txt").read_text() == "the user's file"


def sft_args(out):
    return ["--train", "data/sft.jsonl", "--probe", "data/prompts.jsonl", "--base", "models/base", "--out", out,
            "--metrics", f"{out}.json", "--plots", f"{out}.csv"]


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_sft_resumes_exactly_after_a_kill(prepared):
    d = prepared
    smoke_params(d / "params.yaml", **{"sft.steps": 60, "sft.checkpoint_every": 10, "sft.probes": 0})  # 3.75 epochs
    helpers.stage("sft", *sft_args("models/straight"), cwd=d)
    assert not (d / ".checkpoints" / "sft").exists()  # removed once the outputs are written

    proc = subprocess.Popen([sys.executable, "-m", "stages.sft", *sft_args("models/resumed")], cwd=d,
                            env=helpers.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = d / ".checkpoints" / "sft" / "meta.json"
    deadline = time.time() + 120
    while not meta.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert meta.exists(), "no checkpoint was written before the stage ended"
    assert not (d / "models" / "resumed").exists()  # killed: no output that looks complete
    out = helpers.stage("sft", *sft_args("models/resumed"), cwd=d)
    assert "resuming from step" in out.stdout
    a, b = weights(d / "models" / "straight"), weights(d / "models" / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_reward_gate_fails_without_output(prepared):
    d = prepared
    smoke_params(d / "params.yaml", **{"reward.min_accuracy": 1.0, "reward.steps": 2})
    shutil.copytree(d / "models" / "base", d / "models" / "sft", dirs_exist_ok=True)
    out = helpers.stage("reward", "--pairs", "data/preference.jsonl", "--sft", "models/sft", "--base", "models/base",
                        "--out", "models/gated", "--metrics", "gated.json", "--plots", "gated.csv", cwd=d, check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: reward: held-out pairwise accuracy")
    assert "below reward.min_accuracy 1.0" in out.stderr
    assert not (d / "models" / "gated").exists() and not (d / "gated.json").exists()


def test_a_model_without_a_chat_template_says_what_to_set(tmp_path, saved_model):
    model_dir = tmp_path / "no_template"
    shutil.copytree(saved_model, model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    smoke_params(tmp_path / "params.yaml", **{"model.name_or_path": str(model_dir)})
    out = helpers.stage("prepare", "--data-out", "data", "--model-out", "models/base", cwd=tmp_path, check=False)
    assert out.returncode == 2 and not (tmp_path / "data").exists()
    assert out.stderr.strip() == (f"error: model.name_or_path: {model_dir} has no chat template, but the data is "
                                  "conversational; set model.chat_template to a Jinja template (or a file holding "
                                  "one), or give plain-text prompt/completion data")


def test_non_finite_weights_are_never_written(tmp_path, saved_model):
    """A model whose training blew up (NaN or inf weights) fails the stage before any output exists, so
    DVC never records it; a base model with NaN weights is refused by prepare, before any training."""
    from stages.core import models, stage, tracking

    model = models.load_causal_lm(str(saved_model), "cpu")
    tok = models.load_tokenizer(str(saved_model))
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(stage.StageFailed, match=r"^1 weights are NaN or infinite after training .*no model written"):
        stage.write_trained(model, tok, str(tmp_path / "out"), str(tmp_path / "m.json"), {"train/skipped_steps": 9},
                            str(tmp_path / "p.csv"), [], tracking.NullTracker(), 1)
    assert not any(tmp_path.iterdir())

    bad_base = tmp_path / "nan_model"
    model.save_pretrained(bad_base)
    tok.save_pretrained(bad_base)
    smoke_params(tmp_path / "params.yaml", **{"model.name_or_path": str(bad_base)})
    out = helpers.stage("prepare", "--data-out", "data", "--model-out", "models/base", cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().startswith(f"error: model.name_or_path: {bad_base}: 1 weights are NaN or infinite")
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()


def test_a_teacher_of_another_vocabulary_is_refused_before_any_copy(tmp_path, saved_model, tok):
    """teacher@<name> scores the student's tokens: a model with another tokenizer is a one-line error naming
    the params key, and models/<name> is not written; the pipeline's own vocabulary is copied in."""
    from stages.core import models, task

    other_tok = models.build_tokenizer(task.corpus(20), 300)
    other_tok.add_tokens(["<tool_call>"])
    other = tmp_path / "other"
    models.build_tiny_llama(other_tok, 16, 1, 2, 32, 32, 0).save_pretrained(other)
    other_tok.save_pretrained(other)
    smoke_params(tmp_path / "params.yaml", **{"align.distill.external": {"big": str(other), "same": str(saved_model)}})
    out = helpers.stage("teacher", "big", "--base", str(saved_model), "--out", "models/big", cwd=tmp_path, check=False)
    assert out.returncode == 2 and not (tmp_path / "models").exists()
    assert out.stderr.strip() == (f"error: align.distill.external.big: {other}: its tokenizer differs from the "
                                  f"pipeline's ({saved_model}); a teacher scores the student's tokens, so both need "
                                  "one vocabulary")
    out = helpers.stage("teacher", "same", "--base", str(saved_model), "--out", "models/same", cwd=tmp_path)
    assert models.load_tokenizer(str(tmp_path / "models" / "same")).get_vocab() == tok.get_vocab()
