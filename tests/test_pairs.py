"""The pairs stage's choice of chosen and rejected: best against worst, and a completion that never
ended (no end-of-turn token) is never chosen, whatever it scores."""

import pytest

from stages.pairs import build_pairs


def sample(score, truncated=False, ids=None):
    return {"prompt": "p", "prompt_ids": [1], "completion": str(score), "completion_ids": ids or [int(score * 10)],
            "truncated": truncated, "ref_logp": -1.0, "score": score, "verifier": None}


def test_best_against_worst_and_ties_dropped():
    pairs, counts = build_pairs([sample(0.2), sample(0.9), sample(0.5), sample(0.4), sample(0.4, ids=[7])], 5)
    assert len(pairs) == 1 and pairs[0]["chosen_score"] == 0.9 and pairs[0]["rejected_score"] == 0.2
    _, counts = build_pairs([sample(0.4), sample(0.4, ids=[9])], 2)
    assert counts["ties"] == 1


@pytest.mark.parametrize("mode", ["drop", "penalize"])
def test_a_truncated_completion_is_never_chosen(mode):
    group = [sample(2.0, truncated=True), sample(0.5), sample(0.1)]
    pairs, counts = build_pairs(group, 3, truncated=mode, penalty=1.0)
    assert pairs[0]["chosen_score"] == 0.5
    if mode == "drop":
        assert pairs[0]["rejected_score"] == 0.1 and counts["truncated_dropped"] == 1
    else:  # kept as a rejected candidate: 2.0 - 1.0 = 1.0 ranks above 0.1, so 0.1 is still the worst
        assert pairs[0]["rejected_score"] == 0.1 and counts["truncated_penalized"] == 1
    pairs, _ = build_pairs([sample(0.3, truncated=True), sample(0.5)], 2, truncated="penalize", penalty=1.0)
    assert pairs[0]["chosen_score"] == 0.5 and pairs[0]["rejected_truncated"]  # penalized below the finished one


def test_a_group_with_no_finished_completion_gives_no_pair():
    pairs, counts = build_pairs([sample(0.9, True), sample(0.1, True)], 2, truncated="penalize")
    assert pairs == [] and counts["unfinished"] == 1
    pairs, counts = build_pairs([sample(0.9, True), sample(0.1, True)], 2, truncated="drop")
    assert pairs == [] and counts["unscorable"] == 1 and counts["truncated_dropped"] == 2


def test_flipped_pairs_swap_every_field_of_their_sides_and_only_the_share_asked():
    from stages.pairs import SIDES, flip, unpaired

    groups = [s for g in range(10) for s in (sample(g + 0.9, ids=[100 + g]), sample(g + 0.1, ids=[200 + g]))]
    pairs, _ = build_pairs(groups, 2)
    flipped = flip(pairs, 0.3, seed=0)
    swapped = [i for i, (a, b) in enumerate(zip(pairs, flipped)) if a != b]
    assert len(swapped) == 3 and flip(pairs, 0.3, seed=0) == flipped  # round(0.3 · 10), the same from the seed
    for i in swapped:
        for f in SIDES:
            assert flipped[i][f"chosen{f}"] == pairs[i][f"rejected{f}"]
            assert flipped[i][f"rejected{f}"] == pairs[i][f"chosen{f}"]
        assert flipped[i]["chosen_score"] < flipped[i]["rejected_score"]
    labels = {(r["completion_ids"][0], r["label"]) for r in unpaired(flipped)}  # KTO's labels flip with them
    assert (200 + swapped[0], True) in labels and (100 + swapped[0], False) in labels
    assert flip(pairs, 0.0, seed=0) == pairs
