"""The one-run privacy-audit estimator of Steinke, Nasr and Jagielski (NeurIPS 2023).

"Privacy Auditing with One (1) Training Run", Theorem 3.1 / Proposition 5.2:
m canaries are each included in training independently with probability 1/2;
the auditor guesses inclusion for r of them and is right on v. If training is
(epsilon, delta)-DP, the chance of v or more correct guesses is at most

    p(epsilon) = min(1, beta + 2 m delta alpha),
    beta  = P[Binomial(r, q) >= v],                    q = e^epsilon / (1 + e^epsilon),
    alpha = max_{i = 1..v} P[v - i <= Binomial(r, q) < v] / i,

so the largest epsilon with p(epsilon) < p0 (p0 = 0.05 for 95% confidence) is
a lower bound on the epsilon the training really has: seeing v correct guesses
would be too unlikely under any smaller epsilon.
"""

from __future__ import annotations

import math

from scipy.stats import binom

MAX_EPSILON = 60.0


def p_value(epsilon: float, m: int, r: int, v: int, delta: float = 0.0) -> float:
    """Upper bound on P[>= v of r guesses correct] under (epsilon, delta)-DP with m canaries."""
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))  # e^eps / (1 + e^eps), stable for large epsilon
    beta = float(binom.sf(v - 1, r, q))  # P[X >= v]
    alpha = 0.0
    if delta > 0:
        below_v = float(binom.cdf(v - 1, r, q))  # P[X <= v - 1]
        for i in range(1, v + 1):
            # P[v - i <= X < v] = P[X <= v - 1] - P[X <= v - i - 1]
            alpha = max(alpha, (below_v - float(binom.cdf(v - i - 1, r, q))) / i)
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """The largest epsilon with p(epsilon) < 1 - confidence (0 when even epsilon 0 explains the guesses)."""
    threshold = 1.0 - confidence
    if p_value(0.0, m, r, v, delta) >= threshold:
        return 0.0
    low, high = 0.0, MAX_EPSILON
    if p_value(high, m, r, v, delta) < threshold:
        return high
    for _ in range(60):  # p increases with epsilon: bisect the crossing
        middle = (low + high) / 2
        if p_value(middle, m, r, v, delta) < threshold:
            low = middle
        else:
            high = middle
    return low


def ceiling(m: int, r: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """The largest lower bound m canaries and r guesses can certify: every guess right."""
    return epsilon_lower_bound(m, r, r, delta, confidence)


__all__ = ["ceiling", "epsilon_lower_bound", "p_value"]
