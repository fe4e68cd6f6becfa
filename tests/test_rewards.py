"""Built-in rewards: degenerate outputs never beat a plain wrong answer; a reward that cannot be
computed is "no reward" (NaN, excluded, counted), never a silent 0."""

import math

import pytest
import torch

from stages.core import config, rewards

ANSWER = "64"  # 12+34=46, digits reversed
PLAIN_WRONG = ("65", False)
DEGENERATE = {
    "empty": ("", False),
    "prompt copy": ("12+34=", False),
    "format only": ("0", False),  # well-formed, says nothing: the embedded format is just digits
    "over-long": ("6464646464", True),  # ran out of tokens without EOS
    "whitespace": ("   ", False),
    "answer then junk": ("64 64", False),
    "truncated right answer": ("64", True),  # the right digits but no EOS: not well-formed
}
BUILT_IN = {
    "verifier": config.RewardWeights(reward_model=0.0, verifier=1.0),
    "format": config.RewardWeights(reward_model=0.0, format=1.0),
    "verifier + format": config.RewardWeights(reward_model=0.0, verifier=1.0, format=0.5),
    "think format": config.RewardWeights(reward_model=0.0, think_format=1.0),
}


def score(weights, text, truncated, answer=ANSWER):
    """The mix of the built-in text rewards of one completion, as score_completions weighs them."""
    fmt = rewards.format_ok(text, truncated, weights.format_pattern)
    values = {"verifier": [rewards.verify(text, answer)], "format": [fmt],
              "think_format": rewards.think_format_reward([text], [truncated])}
    return rewards.mix([(w, values[name]) for name, w, _ in rewards.reward_functions(weights)])


@pytest.mark.parametrize("reward", list(BUILT_IN))
@pytest.mark.parametrize("case", [c for c in DEGENERATE if c != "truncated right answer"])
def test_degenerate_outputs_never_beat_a_plain_wrong_answer(reward, case):
    weights = BUILT_IN[reward]
    assert score(weights, *DEGENERATE[case]).item() <= score(weights, *PLAIN_WRONG).item()


def test_the_right_answer_wins_and_an_empty_reference_is_no_free_pass():
    w = BUILT_IN["verifier + format"]
    assert score(w, ANSWER, False).item() == 1.5
    assert score(w, *DEGENERATE["truncated right answer"]).item() == 1.0  # correct digits, no format credit
    assert rewards.verify("", "") == 0.0  # an empty answer never checks, even against an empty reference


def test_a_verifier_that_cannot_run_is_no_reward_not_zero():
    w = BUILT_IN["verifier"]
    assert rewards.verify("64", None) is None
    total = rewards.mix([(w.verifier, [1.0, None, 0.0])])
    assert total[0] == 1.0 and math.isnan(total[1]) and total[2] == 0.0


def test_score_completions_counts_the_unscored(tok):
    from stages.core import data

    texts = ["64", "65", "1"]
    seqs = data.collate([[1, 2]] * 3, [[5, tok.eos_token_id]] * 3, tok.pad_token_id)
    s = rewards.score_completions(BUILT_IN["verifier + format"], texts, [False, False, False],
                                  {"answer": ["64", "64", None]}, rm=None, seqs=seqs, batch_size=8)
    assert s.verifier == [1.0, 0.0, None] and s.format == [1.0, 1.0, 1.0] and s.reward_model is None
    assert s.total[:2].tolist() == [1.5, 0.5] and torch.isnan(s.total[2]) and s.n_unscored == 1


def test_think_format_reward():
    ok = "<think>4 + 6 = 10, carry 1</think> The answer is 64."
    bad = ["<think></think> 64", "<think>x</think>", "64 <think>x</think>", "<think>a</think><think>b</think> 64",
           "<think>x 64"]
    assert rewards.think_format_reward([ok, *bad], [False] * 6) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert rewards.think_format_reward([ok], [True]) == [0.0]  # never ended: no format credit


def length_penalty(completions, answer, **kwargs):
    """A user's reward function in TRL's interface (used by the next test through its module:function name)."""
    return [None if a is None else -len(c) / 10 for c, a in zip(completions, answer)]


def returns_nothing(completions, **kwargs):
    return None


def test_a_user_reward_function_by_module_and_name(tok):
    from stages.core import data

    w = config.RewardWeights(reward_model=0.0, verifier=1.0, functions={"tests.test_rewards:length_penalty": 1.0})
    seqs = data.collate([[1, 2]] * 3, [[5, tok.eos_token_id]] * 3, tok.pad_token_id)
    s = rewards.score_completions(w, ["64", "6400", "64"], [False] * 3, {"answer": ["64", "64", None]}, None, seqs, 8)
    assert s.total[:2].tolist() == pytest.approx([1.0 - 0.2, 0.0 - 0.4]) and torch.isnan(s.total[2])
    assert s.parts["tests.test_rewards:length_penalty"][2] is None


def test_bad_reward_functions_are_one_line_errors(tok):
    from stages.core import data

    with pytest.raises(ValueError, match="not `module:function`"):
        config.RewardWeights(functions={"no_colon": 1.0})
    seqs = data.collate([[1, 2]], [[5, tok.eos_token_id]], tok.pad_token_id)
    for name, match in (("tests.nope:f", "cannot import"), ("tests.test_rewards:ANSWER", "not callable"),
                        ("tests.test_rewards:returns_nothing", "returned NoneType")):
        w = config.RewardWeights(reward_model=0.0, functions={name: 1.0})
        with pytest.raises(config.ConfigError, match=match):
            rewards.score_completions(w, ["64"], [False], {"answer": ["64"]}, None, seqs, 8)


def test_a_reference_the_verifier_cannot_read_is_a_one_line_error():
    v = config.VerifierConfig(extract="auto", compare="math")
    rewards.check_references([{"answer": "85"}, {"answer": None}, {"answer": "\\frac{1}{2}"}], v, "p.jsonl")
    with pytest.raises(config.ConfigError, match=r"^p.jsonl: row 2: the verifier cannot read the reference answer "
                                                 r"'banana' \(verifier.compare: math; check data.answer_column\)$"):
        rewards.check_references([{"answer": "85"}, {"answer": "banana"}], v, "p.jsonl")


def inverse_length(completions, **kwargs):
    """A user's reward function with a bug: an empty completion divides by zero."""
    return [1.0 / len(c) for c in completions]


def test_a_reward_function_that_raises_ends_the_stage_in_one_line_naming_it(tok, tmp_path, capsys, monkeypatch):
    """Its traceback goes to the log first; the last line names the function, the exception and the line of
    the user's file it came from; the stage exits 1 and writes nothing."""
    from stages.core import data, stage

    for var in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):  # stage.run sets them: restored after
        monkeypatch.setenv(var, "error" if var == "TRANSFORMERS_VERBOSITY" else "1")
    w = config.RewardWeights(reward_model=0.0, functions={"tests.test_rewards:inverse_length": 1.0})
    seqs = data.collate([[1, 2]] * 2, [[5, tok.eos_token_id]] * 2, tok.pad_token_id)
    out = tmp_path / "scores.json"

    def main(argv):
        s = rewards.score_completions(w, ["64", ""], [False, False], {"answer": ["64", "64"]}, None, seqs, 8)
        out.write_text(str(s.total.tolist()))
        return "scored"

    with pytest.raises(SystemExit) as e:
        stage.run(main, [])
    line = inverse_length.__code__.co_firstlineno + 2
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and not out.exists()
    assert err[-1] == (f"error: reward function tests.test_rewards:inverse_length raised ZeroDivisionError: "
                       f"float division by zero at tests/test_rewards.py:{line} (its traceback is above)")
    assert err[0] == "Traceback (most recent call last):" and f'line {line}, in inverse_length' in "\n".join(err)
