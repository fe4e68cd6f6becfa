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
    ({"align": {"methods": ["dpo", "distill"]}},
     "params.yaml: align.methods: distill runs once per teacher: list its teachers in align.distill.teachers"),
    ({"align": {"methods": ["dpo"], "distill": {"teachers": ["grpo"]}}},
     "params.yaml: align: distill.teachers: 'grpo' is not a policy of this pipeline (sft or one of align.methods"),
    ({"align": {"distill": {"teachers": ["sft", "sft"]}}},
     "params.yaml: align.distill.teachers: a teacher is listed twice"),
    ({"align": {"distill": {"external": {"reward": "/models/x"}}}},
     "params.yaml: align.distill.external: 'reward' is the name of one of the pipeline's own models"),
    ({"align": {"distill": {"external": {"distill_x": "/models/x"}}}},
     "params.yaml: align.distill.external: 'distill_x' is the name of one of the pipeline's own models"),
    ({"align": {"distill": {"external": {"a/b": "/models/x"}}}},
     "params.yaml: align.distill.external: 'a/b': a name is letters, digits"),
    ({"align": {"distill": {"divergence": "jsd", "logprob_chunk": 4}}},
     "params.yaml: align.distill: divergence jsd needs both models' whole next-token distributions"),
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


# ---------------------------------------------------------------------------------------------- check stage
# What params.yaml names, checked by the check stage (and flows.repro.preflight) without running it.

REWARDS = """\
raise SystemExit("the check stage ran user code")  # never reached: the source is parsed, not imported


def bonus(completions, **kwargs):
    return [0.0 for _ in completions]


try:
    from json import loads as parse_reply
except ImportError:
    parse_reply = None
"""


def reward_params(*names: str, method: str = "grpo") -> config.Params:
    return config.parse({"align": {"methods": ["dpo", method],
                                   method: {"reward": {"verifier": 1.0, "functions": dict.fromkeys(names, 1.0)}}}})


def test_check_finds_reward_functions_without_running_their_modules(tmp_path):
    from stages import check

    (tmp_path / "my_rewards.py").write_text(REWARDS)
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text('raise SystemExit("a parent package ran")\n')
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "scores.py").write_text(REWARDS)
    names = ["my_rewards:bonus", "my_rewards:parse_reply", "pkg.sub.scores:bonus", "tests.test_rewards:length_penalty"]
    check.check_names(reward_params(*names), tmp_path)  # all there; none of their code ran
    assert check.reward_functions(reward_params(*names)), "no reward function was checked"
    for name, why in [
        ("my_rewards:bonsu", f"no function named 'bonsu' in {tmp_path / 'my_rewards.py'}"),
        ("my_rewardz:bonus", "no module named 'my_rewardz' (looked in the project root and the Python path)"),
        ("pkg.sub.nope:bonus", "no module named 'pkg.sub.nope' (looked in the project root and the Python path)"),
        ("my_rewards.sub:bonus", "my_rewards is a module, not a package"),
    ]:
        with pytest.raises(config.ConfigError) as e:
            check.check_names(reward_params("tests.test_rewards:length_penalty", name, method="rloo"), tmp_path)
        assert str(e.value) == f"align.rloo.reward.functions: {name}: {why}"
    unused = config.parse({"align": {"methods": ["dpo"], "rloo": {"reward": {"functions": {"my_rewardz:f": 1.0}}}}})
    check.check_names(unused, tmp_path)  # a method that does not run: its section is validated, not its functions
    broken = tmp_path / "broken.py"
    broken.write_text("def bonus(completions, **kwargs)\n    return []\n")
    with pytest.raises(config.ConfigError, match=rf"^pairs.score.functions: broken:bonus: {broken}:1: cannot be "
                                                 r"imported \(expected ':'\)$"):
        check.check_names(config.parse({"pairs": {"score": {"functions": {"broken:bonus": 1.0}}}}), tmp_path)


def test_the_check_stage_stops_on_a_reward_function_it_cannot_find(tmp_path):
    """The whole stage, as `dvc repro` runs it first: one line naming the key, exit 2, nothing written."""
    from tests import helpers

    (tmp_path / "my_rewards.py").write_text(REWARDS)
    (tmp_path / "params.yaml").write_text("align:\n  methods: [grpo]\n  grpo:\n    reward:\n      verifier: 1.0\n"
                                          "      functions: {my_rewards:bonsu: 0.5}\n")
    out = helpers.stage("check", "--out", "inputs.lock.json", cwd=tmp_path, check=False)
    assert out.returncode == 2 and not (tmp_path / "inputs.lock.json").exists()
    assert out.stderr == ("error: align.grpo.reward.functions: my_rewards:bonsu: no function named 'bonsu' in "
                          "my_rewards.py\n")


def test_check_finds_missing_models_data_and_templates(tmp_path, monkeypatch):
    from stages import check

    hub = tmp_path / "hub"
    (hub / "models--org--cached" / "refs").mkdir(parents=True)
    (hub / "models--org--cached" / "refs" / "main").write_text("abc123\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline unless set to 0, as every stage runs
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    (tmp_path / "no_config").mkdir()
    (tmp_path / "sft.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    ok = {"model": {"name_or_path": "org/cached", "chat_template": "{{ messages }}"}, "data": {"sft": "sft.jsonl"}}
    check.check_names(config.parse(ok), tmp_path)
    teacher = config.parse({"align": {"distill": {"external": {"big": "org/cached"}}}})
    check.check_names(teacher, tmp_path)
    assert check.inputs(teacher, {})["align.distill.external.big"] == {"source": "org/cached", "hub_revision": "abc123"}
    for raw, message in [
        ({"model": {"name_or_path": "org/not-cached"}},
         "model.name_or_path: org/not-cached: no such path, and no model of that name in the local Hugging Face "
         "cache (nothing is downloaded at run time: `hf download org/not-cached` first)"),
        ({"model": {"name_or_path": "./models/mine"}}, "model.name_or_path: model path './models/mine' does not exist"),
        ({"model": {"name_or_path": "no_config"}},
         "model.name_or_path: 'no_config' is a directory without config.json (not a saved model)"),
        ({"model": {"chat_template": "templates/chatml.jinja"}},
         "model.chat_template: templates/chatml.jinja: no such file (and not a Jinja template)"),
        ({"data": {"eval": "inputs/eval.jsonl"}}, "data.eval: inputs/eval.jsonl: no such file or directory"),
        ({"align": {"distill": {"external": {"big": "org/not-cached"}}}},
         "align.distill.external.big: org/not-cached: no such path, and no model of that name in the local Hugging "
         "Face cache (nothing is downloaded at run time: `hf download org/not-cached` first)"),
        ({"align": {"distill": {"external": {"big": "no_config"}}}},
         "align.distill.external.big: 'no_config' is a directory without config.json (not a saved model)"),
        ({"data": {"prompts": "org/prompts:train"}},
         "data.prompts: org/prompts:train: no such path, and no dataset of that name in the local Hugging Face cache "
         "(nothing is downloaded at run time: `hf download org/prompts --repo-type dataset` first)"),
    ]:
        with pytest.raises(config.ConfigError) as e:
            check.check_names(config.parse(raw), tmp_path)
        assert str(e.value) == message
    (tmp_path / "home" / "datasets" / "org___prompts").mkdir(parents=True)  # a dataset `datasets` cached
    check.check_names(config.parse({"data": {"prompts": "org/prompts:train"}}), tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # downloads allowed: a hub id is the loader's business
    check.check_names(config.parse({"model": {"name_or_path": "org/not-cached"}}), tmp_path)


def test_every_method_section_is_validated_whether_or_not_it_runs():
    """The schema already checks each method's section (not only the listed methods'): a typo in one that
    does not run is still one line naming the key."""
    with pytest.raises(config.ConfigError, match=r"^params.yaml: align.rloo.betta: unknown key$"):
        config.parse({"align": {"methods": ["dpo"], "rloo": {"betta": 0.1}}})


def test_an_external_teacher_is_a_policy_to_distill_from():
    p = config.parse({"align": {"methods": ["dpo"], "distill": {"teachers": ["big"], "external": {"big": "/m"}}}})
    assert p.align.policies() == ["dpo", "distill_big"]
