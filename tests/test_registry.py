"""The method registry: each method is one record plus its params section; a half-registered method is a
one-line error at load (exit 2, before any work), not an AttributeError deep in training."""

import dataclasses

import pytest

from stages import align
from stages.core import config, stage
from stages.methods import registry


def test_every_method_has_a_record_and_a_section():
    registry.check()
    assert set(registry.REGISTRY) == set(config.METHOD_CONFIGS) == {
        "ppo", "dpo", "ipo", "kto", "grpo", "rloo", "simpo", "orpo", "gspo", "cispo", "reinforce_pp", "distill"}
    assert {m.kind for m in registry.REGISTRY.values()} == {"offline", "online"}


@pytest.mark.parametrize("change, message", [
    ({"grpo": {"loss": None}}, "method 'grpo': its record lacks loss"),
    ({"dpo": {"loss": None}}, "method 'dpo': its record lacks loss"),
    ({"kto": {"step": None}}, "method 'kto': its record lacks step"),
    ({"rloo": {"advantages": None, "units": None}}, "method 'rloo': its record lacks advantages, units"),
])
def test_a_record_missing_a_piece_is_a_one_line_error(change, message):
    broken = {n: dataclasses.replace(m, **change.get(n, {})) for n, m in registry.REGISTRY.items()}
    with pytest.raises(config.ConfigError, match=message):
        registry.check(broken)


def test_a_method_without_a_section_or_without_a_record():
    extra = {**registry.REGISTRY, "cpo": dataclasses.replace(registry.REGISTRY["dpo"], name="cpo")}
    with pytest.raises(config.ConfigError, match="method 'cpo' has no params section"):
        registry.check(extra)
    fewer = {n: m for n, m in registry.REGISTRY.items() if n != "rloo"}
    with pytest.raises(config.ConfigError, match="method 'rloo' has a params section .* but no record"):
        registry.check(fewer)


def test_the_align_stage_stops_at_load_with_one_line(monkeypatch, tmp_path, capsys):
    broken = {**registry.REGISTRY, "grpo": dataclasses.replace(registry.REGISTRY["grpo"], units=None)}
    monkeypatch.setattr(registry, "REGISTRY", broken)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    with pytest.raises(SystemExit) as exit_:
        stage.run(align.main, ["grpo", "--pairs", "p", "--prompts", "p", "--sft", "s", "--reward", "r",
                               "--out", "o", "--metrics", "m", "--plots", "c"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: method 'grpo': its record lacks units (stages/methods/registry.py)"]
    assert not (tmp_path / "o").exists()
