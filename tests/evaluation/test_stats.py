"""Intervals and paired tests against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from memllm.evaluation.stats import (
    bootstrap_ci,
    holm_adjust,
    mcnemar_exact,
    paired_test,
    summarize,
    wilson_interval,
)

# ---- Wilson ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "n", "expected"),
    [
        (8, 10, (0.4902, 0.9433)),  # textbook example
        (50, 100, (0.4038, 0.5962)),  # symmetric around 0.5
        # 0/n: centre = half-width = (z²/2n)/(1 + z²/n) = 0.19207/1.38415 → high 0.2775
        (0, 10, (0.0, 0.2775)),
        (10, 10, (0.7225, 1.0)),
    ],
)
def test_wilson_known_values(successes, n, expected):
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(expected[0], abs=5e-4)
    assert high == pytest.approx(expected[1], abs=5e-4)
    assert 0.0 <= low <= successes / n <= high <= 1.0


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    narrow, wide = wilson_interval(8, 10, 0.90), wilson_interval(8, 10, 0.99)
    assert wide[0] < narrow[0] and wide[1] > narrow[1]
    for bad in [(11, 10), (-1, 10), (1, -1)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=1.0)


# ---- bootstrap ------------------------------------------------------------------------------


def test_bootstrap_deterministic_and_sane():
    values = np.random.default_rng(1).normal(0.5, 1.0, size=400)
    first = bootstrap_ci(values, n_resamples=2000, seed=3)
    assert first == bootstrap_ci(values, n_resamples=2000, seed=3)
    assert first != bootstrap_ci(values, n_resamples=2000, seed=4)
    low, high = first
    assert low < values.mean() < high
    # Width close to the normal-theory 2 · 1.96 · sd / sqrt(n).
    expected = 2 * 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert (high - low) == pytest.approx(expected, rel=0.1)


def test_bootstrap_edge_cases():
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    assert bootstrap_ci([0.7]) == (0.7, 0.7)
    assert bootstrap_ci([0.2, 0.2, 0.2]) == (0.2, 0.2)
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([0.1, float("nan")])


def test_bootstrap_large_input_is_chunked_and_deterministic():
    values = np.random.default_rng(0).random(5000)  # 5000 × 1000 draws: several chunks
    a = bootstrap_ci(values, n_resamples=1000, seed=0)
    assert a == bootstrap_ci(values, n_resamples=1000, seed=0)
    assert a[0] < values.mean() < a[1]


def test_bootstrap_coverage():
    """About 95 % of intervals cover the true mean (percentile bootstrap undercovers a little)."""
    rng = np.random.default_rng(0)
    trials, covered = 200, 0
    for k in range(trials):
        sample = rng.exponential(1.0, size=40)  # skewed, true mean 1
        low, high = bootstrap_ci(sample, n_resamples=400, seed=k)
        covered += low <= 1.0 <= high
    assert 0.85 <= covered / trials <= 0.99


# ---- summarize ------------------------------------------------------------------------------


def test_summarize_binary_uses_wilson():
    s = summarize([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    assert s["method"] == "wilson" and s["n"] == 10 and s["value"] == pytest.approx(0.8)
    assert s["ci95"] == list(wilson_interval(8, 10))


def test_summarize_continuous_uses_bootstrap():
    values = [0.1, 0.5, 0.9, 0.3, 0.7]
    s = summarize(values, n_resamples=500)
    assert s["method"] == "bootstrap" and s["value"] == pytest.approx(0.5)
    assert s["ci95"] == list(bootstrap_ci(values, n_resamples=500))
    # Forcing continuous on 0/1 data bootstraps it.
    assert summarize([0, 1, 1], "continuous", n_resamples=100)["method"] == "bootstrap"


def test_summarize_errors_and_empty():
    assert summarize([])["n"] == 0 and math.isnan(summarize([])["value"])
    with pytest.raises(ValueError, match="binary"):
        summarize([0.5, 1.0], "binary")
    with pytest.raises(ValueError):
        summarize([0, 1], "ordinal")


# ---- McNemar --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a_only", "b_only", "expected"),
    [
        (0, 6, 2 * 0.5**6),  # 0.03125
        (6, 0, 2 * 0.5**6),
        (1, 5, 2 * (1 + 6) / 64),  # 0.21875
        (2, 10, 2 * (1 + 12 + 66) / 4096),  # 0.0385742
        (3, 3, 1.0),  # 2 · 42/64 > 1, capped
        (0, 0, 1.0),  # no discordant pairs
        (0, 1, 1.0),
    ],
)
def test_mcnemar_exact_hand_computed(a_only, b_only, expected):
    assert mcnemar_exact(a_only, b_only) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_huge_counts_do_not_overflow():
    assert 0.0 <= mcnemar_exact(0, 3000) < 1e-300
    assert mcnemar_exact(1500, 1500) == 1.0


def test_paired_test_binary():
    # 6 examples only A gets right, 4 both right, 5 both wrong.
    a = [1] * 6 + [1] * 4 + [0] * 5
    b = [0] * 6 + [1] * 4 + [0] * 5
    t = paired_test(a, b, n_resamples=500)
    assert t["test"] == "mcnemar_exact"
    assert (t["a_only"], t["b_only"], t["n"]) == (6, 0, 15)
    assert t["diff"] == pytest.approx(0.4)
    assert t["p_value"] == pytest.approx(0.03125)
    assert t["significant"] is True
    assert t["ci95"][0] <= 0.4 <= t["ci95"][1]
    back = paired_test(b, a, n_resamples=500)
    assert back["diff"] == pytest.approx(-0.4) and back["p_value"] == t["p_value"]


def test_identical_arms_are_not_different():
    for values in ([1, 0, 1, 1, 0], [0.2, 0.9, 0.4]):
        t = paired_test(values, values, n_resamples=200)
        assert t["diff"] == 0.0 and t["ci95"] == [0.0, 0.0]
        assert t["p_value"] == 1.0 and t["significant"] is False


# ---- sign-flip permutation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("diffs", "expected"),
    [
        ([1.0, 2.0, 3.0], 2 / 8),  # only all-plus and all-minus reach |sum| = 6
        ([1.0, 2.0, 3.0, 4.0], 2 / 16),
        ([1.0, 1.0, 1.0, 1.0, 1.0], 2 / 32),
        # signs over (1, 1, 2) give sums 4, 2, 2, 0, 0, -2, -2, -4: six of eight reach |2|
        ([1.0, -1.0, 2.0], 6 / 8),
    ],
)
def test_sign_flip_exact_hand_computed(diffs, expected):
    b = np.full(len(diffs), 0.25)
    t = paired_test(b + np.asarray(diffs), b, "continuous", n_resamples=1000)
    assert t["test"] == "sign_flip_exact"
    assert t["p_value"] == pytest.approx(expected)
    assert t["diff"] == pytest.approx(np.mean(diffs))


def test_sign_flip_monte_carlo_matches_exact():
    rng = np.random.default_rng(2)
    b = rng.random(12)
    a = b + rng.normal(0.15, 0.3, size=12)
    exact = paired_test(a, b, "continuous", n_resamples=5000)  # 2**12 = 4096 patterns
    approx = paired_test(a, b, "continuous", n_resamples=3000, seed=1)
    assert exact["test"] == "sign_flip_exact"
    assert approx["test"] == "sign_flip_permutation"
    assert approx["p_value"] == pytest.approx(exact["p_value"], abs=0.03)


def test_sign_flip_detects_a_clear_shift_and_not_noise():
    rng = np.random.default_rng(0)
    b = rng.random(200)
    shifted = paired_test(b + 0.1 + rng.normal(0, 0.05, 200), b, n_resamples=2000)
    assert shifted["p_value"] == pytest.approx(1 / 2001) and shifted["significant"]
    noise = paired_test(b + rng.normal(0, 0.05, 200), b, n_resamples=2000)
    assert noise["ci95"][0] < 0 < noise["ci95"][1]


def test_paired_test_needs_pairs():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_test([1, 0], [1, 0, 1])
    with pytest.raises(ValueError):
        paired_test([], [])


def test_holm_adjust():
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm_adjust([]) == []
