"""pass@k: the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374) by hand and against its combinatorial form."""

import math

import pytest

from stages.core import config, evaluation


def test_pass_at_k_by_hand():
    """n = 4 samples, c = 1 correct, k = 2: 1 − C(3, 2)/C(4, 2) = 1 − 3/6 = 0.5. k = 1 is c/n; no correct one gives
    0; fewer wrong ones than k gives 1."""
    assert evaluation.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert evaluation.pass_at_k(4, 3, 1) == pytest.approx(0.75)
    assert evaluation.pass_at_k(4, 0, 4) == 0.0
    assert evaluation.pass_at_k(4, 2, 3) == 1.0


@pytest.mark.parametrize("n", [1, 5, 16, 40])
def test_pass_at_k_equals_the_binomial_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            exact = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert evaluation.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_mean_pass_at_k_over_prompts_leaves_out_unchecked_ones():
    """Two prompts × 4 samples: 1 correct (pass@2 0.5) and 4 correct (1.0); a third whose answers cannot be checked
    (None) is left out: mean 0.75. pass@1 is the samples' mean accuracy, 5/8."""
    scores = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, None, None, None, None]
    assert evaluation.mean_pass_at_k(scores, 4, 2) == pytest.approx(0.75)
    assert evaluation.mean_pass_at_k(scores, 4, 1) == pytest.approx(5 / 8)
    assert evaluation.mean_pass_at_k([None] * 4, 4, 1) is None


def test_a_k_above_n_is_a_params_error():
    with pytest.raises(ValueError, match="pass_k: every k must be in 1..pass_n"):
        config.EvaluateConfig(pass_n=4, pass_k=[1, 8])
    assert config.EvaluateConfig(pass_n=0, pass_k=[1, 8]).pass_n == 0  # off: k not checked
