"""The embedded task's difficulty knob (data.embedded.terms): sums worked column by column, a demonstrator
who drops carries per column, and held-out problems that no training set holds."""

import random

import pytest

from stages.core import config, task
from stages.core.task import Problem


def test_chains_are_worked_column_by_column_by_hand():
    # 17+25: units 7+5 = 12 carry 1 → 42 (written "24"); the carry dropped → 32 ("23").
    p = Problem((17, 25))
    assert p.prompt == "17+25=" and p.answer == "24" and p.carries == [(0, 0)]
    assert p.chain(lambda step, col: True) == [32] and task.written(p.carry_error(random.Random(0))) == "23"
    # 45+38+29: 45+38 = 83 (units 13: a carry), then 83+29 = 112 (units 12 and tens 11: two carries).
    p = Problem((45, 38, 29))
    assert p.chain() == [83, 112] and p.answer == "38 211" and p.carries == [(0, 0), (1, 0), (1, 1)]
    # The first carry dropped: 73 is written, and the next step adds to it: 73 + 29 = 102.
    assert p.chain(lambda step, col: (step, col) == (0, 0)) == [73, 102]
    assert p.chain(lambda step, col: (step, col) == (1, 1)) == [83, 12]  # the hundreds' carry forgotten
    assert {task.written(p.carry_error(random.Random(s))) for s in range(30)} == {"37 201", "38 201", "38 21"}
    # Nothing carries: the error adds one into the tens of the last sum.
    assert Problem((12, 34, 21)).carry_error(random.Random(0)) == [46, 77]  # 46 + 21 = 67, + 10


def test_more_terms_make_the_demonstrator_wrong_more_often():
    """The demonstrator drops each carry with probability carry_slip and carries a wrong sum on: its chains
    are right less often with every term, every step having to be right."""
    right = {}
    for terms in (2, 3, 4):
        _, held = task.split_problems(50, 1000, 0, terms)
        rng = random.Random(1)
        right[terms] = sum(task.written(task.demonstrate(p, rng, 0.6, 0.05)) == p.answer for p in held) / len(held)
    assert right[2] > right[3] + 0.1 > right[4] + 0.2
    assert 0.6 < right[2] < 0.75 and right[4] < 0.3


@pytest.mark.parametrize("terms", [2, 4])
def test_held_out_problems_are_distinct_and_never_trained_on(terms):
    train, held = task.split_problems(50, 640, 3, terms)
    assert len(set(held)) == 640 and not set(held) & set(train)
    assert all(len(p.ops) == terms and max(p.ops) < 50 for p in train[:100] + held)
    sets = task.make_datasets(50, 200, 0.6, 0.05, 100, 0.7, 50, 640, 3, terms)
    held_prompts = {r["prompt"][0]["content"] for r in sets["eval"]}
    trained = {r["prompt"][0]["content"] for name in ("sft", "preference", "prompts") for r in sets[name]}
    assert len(held_prompts) == 640 and not held_prompts & trained
    assert all(r["prompt"][0]["content"].count("+") == terms - 1 and r["answer"].count(" ") == terms - 2
               for r in sets["eval"])


def test_the_chat_variant_asks_every_term():
    sets = task.make_chat_datasets(50, 50, 0.6, 0.05, 10, 0.7, 10, 20, 0, terms=3)
    for row in sets["eval"]:
        q = row["prompt"][0]["content"]
        assert sum(c.isdigit() for c in q) >= 3 and int(row["answer"]) <= 3 * 49
    # the reply works the chain in words, its last number the answer: "5 + 3 = 8, 8 + 47 = 55."
    assert all(r["chosen"][0]["content"].count("=") == 2 for r in sets["preference"])
    two = task.make_chat_datasets(50, 50, 0.6, 0.05, 10, 0.7, 10, 20, 0)
    assert any(r["prompt"][0]["content"].startswith("Add ") and " and " in r["prompt"][0]["content"]
               and "," not in r["prompt"][0]["content"] for r in two["sft"] + two["eval"])


def test_the_code_task_takes_two_terms_only():
    with pytest.raises(ValueError, match="terms: python_functions writes f"):
        config.EmbeddedData(task="python_functions", terms=3)
    assert config.EmbeddedData(task="chat_arithmetic", terms=3).terms == 3
