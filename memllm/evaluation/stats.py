"""Confidence intervals and paired significance tests for evaluation results.

Every number memllm reports comes with an interval, and every claim that one arm beats another
comes with a paired test on the same examples:

* **Binary metrics** (accuracy, exact match: every value 0 or 1) get the Wilson score interval,
  which stays inside [0, 1] and behaves at 0 % and 100 % where the normal approximation does not.
  Two arms are compared with the exact McNemar test: only the discordant examples (one arm right,
  the other wrong) carry information, and under the null hypothesis each discordant example goes
  either way with probability 1/2, so the p-value is a two-sided binomial tail computed exactly
  with integers (no scipy).
* **Continuous metrics** (F1, token accuracy) get a percentile bootstrap of the mean. Two arms
  are compared with a sign-flip permutation test on the per-example differences (exact
  enumeration of all sign patterns when there are few examples, Monte Carlo otherwise).
* The interval of a difference is always the paired bootstrap of the per-example differences.

Everything is deterministic under ``seed`` and vectorised with numpy (resamples are drawn in
chunks so memory stays bounded for large evaluation sets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

Kind = Literal["auto", "binary", "continuous"]

ALPHA = 0.05
"""Two-sided significance level used for the ``significant`` flag."""

_CHUNK_ELEMENTS = 2_000_000  # resample rows × examples drawn at once (≈16 MB of indices)


def _as_array(values: Sequence[float] | np.ndarray, name: str = "values") -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name}: non-finite value {arr[bad]!r} at index {bad}")
    return arr


def _check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return float(confidence)


def is_binary(values: Sequence[float] | np.ndarray) -> bool:
    """True when every value is exactly 0 or 1 (and there is at least one value)."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    return arr.size > 0 and bool(np.all((arr == 0.0) | (arr == 1.0)))


def resolve_kind(kind: Kind, *arrays: Sequence[float] | np.ndarray) -> str:
    """``"binary"`` or ``"continuous"``; ``"auto"`` is binary when every array is all 0/1."""
    if kind == "auto":
        return "binary" if all(is_binary(a) for a in arrays) else "continuous"
    if kind not in ("binary", "continuous"):
        raise ValueError(f"kind must be 'auto', 'binary' or 'continuous', got {kind!r}")
    if kind == "binary" and not all(is_binary(a) for a in arrays):
        raise ValueError("kind='binary' but some values are not 0 or 1")
    return kind


# --------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n``.

    Args:
        successes: number of successes, ``0 <= successes <= n``.
        n: number of trials; ``n = 0`` gives the uninformative interval ``(0.0, 1.0)``.
        confidence: two-sided confidence level.

    Returns:
        ``(low, high)``, both within [0, 1].
    """
    confidence = _check_confidence(confidence)
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # Exact ends: 0/n has low 0 and n/n has high 1 (rounding would leave ±1e-17).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def _bootstrap_means(arr: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` resamples (with replacement) of ``arr``, drawn in chunks."""
    rng = np.random.default_rng(seed)
    n = arr.size
    chunk = max(1, _CHUNK_ELEMENTS // n)
    out = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = arr[idx].mean(axis=1)
    return out


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean.

    Args:
        values: per-example values.
        confidence: two-sided confidence level.
        n_resamples: number of bootstrap resamples.
        seed: seed of the resampling; the same inputs and seed give the same interval.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no values, ``(v, v)`` for one value or constant ones.
    """
    confidence = _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    arr = _as_array(values)
    if arr.size == 0:
        return (math.nan, math.nan)
    if np.all(arr == arr[0]):
        return (float(arr[0]), float(arr[0]))
    means = _bootstrap_means(arr, n_resamples, seed)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return (float(low), float(high))


def summarize(
    values: Sequence[float] | np.ndarray,
    kind: Kind = "auto",
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean of ``values`` with its 95 % interval.

    Args:
        values: per-example values of one metric.
        kind: ``"binary"`` (Wilson interval), ``"continuous"`` (bootstrap of the mean) or
            ``"auto"`` (binary when every value is 0 or 1).
        confidence: two-sided confidence level.
        n_resamples: bootstrap resamples (continuous metrics only).
        seed: bootstrap seed.

    Returns:
        ``{"value": mean, "ci95": [low, high], "n": count, "method": "wilson" | "bootstrap"}``;
        ``value`` and the interval are ``nan`` when there are no values.
    """
    arr = _as_array(values)
    n = int(arr.size)
    if n == 0:
        return {"value": math.nan, "ci95": [math.nan, math.nan], "n": 0, "method": "none"}
    kind = resolve_kind(kind, arr)
    if kind == "binary":
        low, high = wilson_interval(int(arr.sum()), n, confidence)
        method = "wilson"
    else:
        low, high = bootstrap_ci(arr, confidence, n_resamples, seed)
        method = "bootstrap"
    return {"value": float(arr.mean()), "ci95": [low, high], "n": n, "method": method}


# --------------------------------------------------------------------------------------------
# Paired tests
# --------------------------------------------------------------------------------------------


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts.

    ``a_only`` examples are right under A and wrong under B, ``b_only`` the reverse. Under the
    null hypothesis each of the ``d = a_only + b_only`` discordant examples favours A with
    probability 1/2, so ``p = min(1, 2 · P(Binomial(d, 1/2) <= min(a_only, b_only)))``, computed
    with exact integers. No discordant examples gives ``p = 1``.
    """
    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {a_only}, {b_only}")
    d = a_only + b_only
    if d == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(d, i) for i in range(k + 1))
    # Integer / integer is correctly rounded in Python even when 2**d overflows a float.
    return min(1.0, (2 * tail) / (1 << d))


def _sign_flip_p(diffs: np.ndarray, n_resamples: int, seed: int) -> tuple[float, bool]:
    """Two-sided sign-flip permutation p-value for ``mean(diffs) == 0``; (p, exact)."""
    n = diffs.size
    observed = abs(diffs.mean())
    # Tolerance so that patterns equal to the observed statistic count as "as extreme".
    tol = 1e-12 * max(1.0, float(np.abs(diffs).max()))
    if n <= 20 and (1 << n) <= n_resamples:
        # Exact: enumerate every sign pattern (bit j of pattern i flips example j).
        patterns = np.arange(1 << n, dtype=np.int64)[:, None]
        signs = 1.0 - 2.0 * ((patterns >> np.arange(n)) & 1)
        stats = np.abs(signs @ diffs) / n
        return float(np.mean(stats >= observed - tol)), True
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    hits = 0
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(rows, n))
        hits += int(np.count_nonzero(np.abs(signs @ diffs) / n >= observed - tol))
    # The observed pattern counts as one of the permutations (never p = 0).
    return (hits + 1) / (n_resamples + 1), False


def paired_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    kind: Kind = "auto",
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """Compare arm ``a`` with arm ``b`` on the same examples (same order).

    Args:
        a: per-example values of the arm under test.
        b: per-example values of the reference arm, aligned with ``a``.
        kind: ``"binary"`` (exact McNemar), ``"continuous"`` (sign-flip permutation test) or
            ``"auto"`` (binary when both are all 0/1).
        confidence: level of the interval of the difference (paired bootstrap).
        n_resamples: bootstrap resamples, and permutation resamples when not exact.
        seed: seed of the bootstrap and of the permutation test.
        alpha: significance level of the ``significant`` flag (two-sided).

    Returns:
        ``{"diff": mean(a) - mean(b), "ci95": [low, high], "p_value", "test", "significant",
        "n"}``; binary tests add ``"a_only"`` / ``"b_only"`` (discordant counts).
    """
    xa, xb = _as_array(a, "a"), _as_array(b, "b")
    if xa.size != xb.size:
        raise ValueError(f"paired test needs equal lengths, got {xa.size} and {xb.size}")
    n = int(xa.size)
    if n == 0:
        raise ValueError("paired test needs at least one example")
    kind = resolve_kind(kind, xa, xb)
    diffs = xa - xb
    low, high = bootstrap_ci(diffs, confidence, n_resamples, seed)
    result: dict[str, Any] = {"diff": float(diffs.mean()), "ci95": [low, high]}
    if kind == "binary":
        a_only = int(np.count_nonzero((xa == 1) & (xb == 0)))
        b_only = int(np.count_nonzero((xa == 0) & (xb == 1)))
        p = mcnemar_exact(a_only, b_only)
        result.update(p_value=p, test="mcnemar_exact", a_only=a_only, b_only=b_only)
    elif np.all(diffs == 0):
        result.update(p_value=1.0, test="sign_flip_exact")
    else:
        p, exact = _sign_flip_p(diffs, n_resamples, seed)
        result.update(p_value=p, test="sign_flip_exact" if exact else "sign_flip_permutation")
    result["significant"] = bool(result["p_value"] < alpha)
    result["n"] = n
    return result


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (family-wise error control), in the input order.

    Useful when a report makes several comparisons and one wants to claim any of them: an
    adjusted p below alpha keeps the chance of any false claim in the family below alpha.
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return [float(x) for x in out]
