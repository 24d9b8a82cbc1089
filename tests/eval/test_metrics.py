from __future__ import annotations

import numpy as np
import pytest

from csulora.eval.metrics import bootstrap_ci, exact_match, over_refusal, rate, utility


def test_bootstrap_interval_covers_the_true_rate_about_95_percent():
    # Known distribution: Bernoulli(0.3), n = 100. The percentile bootstrap should
    # cover 0.3 in roughly 95% of samples (it runs a little narrow for small n).
    rng = np.random.default_rng(123)
    trials, covered = 200, 0
    for t in range(trials):
        sample = rng.random(100) < 0.3
        lo, hi = bootstrap_ci(sample, n_resamples=500, seed=t)
        covered += lo <= 0.3 <= hi
    assert 0.88 <= covered / trials <= 0.99


def test_bootstrap_is_deterministic_with_its_fixed_seed():
    data = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    assert bootstrap_ci(data) == bootstrap_ci(data)
    lo, hi = bootstrap_ci(data)
    assert lo < 0.6 < hi


def test_degenerate_and_empty_samples():
    assert rate([True] * 5).ci == (1.0, 1.0)
    with pytest.raises(ValueError):
        rate([])


def test_exact_match_normalises_whitespace_and_a_final_period():
    assert exact_match(" 07/03/1984.\n", "07/03/1984")
    assert not exact_match("7/3/1984", "07/03/1984")
    assert not exact_match("07/03/1984 is the date", "07/03/1984")


def test_utility_and_over_refusal_rates():
    u = utility(["a", "b", "c", "d"], ["a", "b", "x", "y"])
    assert u.value == 0.5 and u.n == 4
    assert over_refusal([True, False, False, False]).value == 0.25
    with pytest.raises(ValueError):
        utility(["a"], ["a", "b"])


def test_broken_answer_shares():
    from csulora.eval.metrics import SHORT_ANSWER_CHARS, benign_short_answer_rate, harmful_empty_rate

    assert SHORT_ANSWER_CHARS == 12
    # 11 characters after strip is short, 12 is an answer; whitespace alone is empty
    answers = ["", "  \n", "Paris.", " " + "x" * 11 + " ", "x" * 12, "The capital is Paris."]
    assert benign_short_answer_rate(answers) == pytest.approx(4 / 6)
    assert harmful_empty_rate(answers) == pytest.approx(2 / 6)
    assert harmful_empty_rate(["I cannot help with that."]) == 0.0
    # the SmolLM2 pipeline's former inline formulas give the same numbers
    assert benign_short_answer_rate(answers) == sum(len(a.strip()) < 12 for a in answers) / len(answers)
    assert harmful_empty_rate(answers) == sum(not a.strip() for a in answers) / len(answers)
    with pytest.raises(ValueError):
        harmful_empty_rate([])


# --------------------------------------------------------------------------- judge agreement


def test_wilson_interval_matches_the_textbook_values():
    from csulora.eval.metrics import wilson_interval

    lo, hi = wilson_interval(8, 10)  # the standard worked example: [0.490, 0.943]
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(4, 4)  # all agree: still a real interval, unlike the bootstrap
    assert hi == 1.0 and lo == pytest.approx(0.5101, abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_agreement_counts_and_rates():
    from csulora.eval.metrics import agreement

    result = agreement([True, True, False, False, True], [True, False, True, False, True])
    assert (result.tp, result.fp, result.fn, result.tn) == (2, 1, 1, 1)
    assert result.accuracy().value == pytest.approx(3 / 5) and result.accuracy().n == 5
    assert result.precision().value == pytest.approx(2 / 3) and result.recall().value == pytest.approx(2 / 3)
    never = agreement([False, False], [True, False])
    assert never.precision() is None and never.recall().value == 0.0
    with pytest.raises(ValueError, match="2 verdicts for 1 labels"):
        agreement([True, False], [True])
