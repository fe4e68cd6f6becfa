"""params.yaml validation: one line naming the key, for every kind of mistake."""

import pytest

from stages.core import config


def test_defaults_validate_and_every_field_is_documented():
    p = config.Params()
    assert p.align.methods == ["dpo", "grpo"]  # one offline and one online method by default

    def walk(model):
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, config.Section):
                yield from walk(value)
            else:
                yield type(model).__name__, name, field.description

    undocumented = [(cls, name) for cls, name, doc in walk(p) if not doc]
    assert list(walk(p)), "walked no fields"
    assert undocumented == []


def test_project_params_files_validate():
    config.load("params.yaml")
    config.load("params.smoke.yaml")


@pytest.mark.parametrize("raw, message", [
    ({"sft": {"lrr": 0.1}}, "params.yaml: sft.lrr: unknown key"),
    ({"sfft": {}}, "params.yaml: sfft: unknown key"),
    ({"sft": {"lr": -1.0}}, "params.yaml: sft.lr: Input should be greater than 0 (got -1.0)"),
    ({"sft": {"steps": "many"}}, "params.yaml: sft.steps: Input should be a valid integer (got 'many')"),
    ({"sft": {"steps": 1.5}}, "params.yaml: sft.steps: Input should be a valid integer (got 1.5)"),
    ({"align": {"methods": ["dpo", "sft2"]}}, "params.yaml: align.methods: unknown method 'sft2'"),
    ({"align": {"dpo": {"beta": 0}}}, "params.yaml: align.dpo.beta: Input should be greater than 0 (got 0)"),
    ({"reward": {"min_accuracy": 1.5}}, "params.yaml: reward.min_accuracy: Input should be less than or equal to 1"),
    ({"pairs": {"score": {"reward_model": 0.0}}}, "params.yaml: pairs.score: at least one reward weight must be > 0"),
])
def test_bad_params_give_one_line_naming_the_key(raw, message):
    with pytest.raises(config.ConfigError) as e:
        config.parse(raw)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_yaml_exponents_are_floats(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("sft:\n  lr: 1e-4\n  steps: 10\n")
    p = config.load(f)
    assert p.sft.lr == pytest.approx(1e-4) and p.sft.steps == 10


def test_unreadable_params_file(tmp_path):
    with pytest.raises(config.ConfigError, match="params file not found"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(bad)
