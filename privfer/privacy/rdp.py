"""Rényi DP of a noise mechanism released over many steps: Poisson subsampling, composition, (epsilon, delta).

Every noise family of distributed DP (:mod:`privfer.privacy.noise`) states the
RDP of ONE unsampled release of its noise at integer orders; this module does
the rest, the same for every family:

Subsampling (a record taken with probability ``q`` per step, Poisson): the
general upper bound of Zhu & Wang (ICML 2019, "Poisson Subsampled Rényi
Differential Privacy", Theorem 6), valid for ANY base mechanism at integer
orders alpha >= 2 and for both directions of add/remove neighbours:

    eps_q(alpha) <= 1/(alpha - 1) log[ (1-q)^(alpha-1) (alpha q - q + 1)
                                       + C(alpha, 2) q^2 (1-q)^(alpha-2) e^eps(2)
                                       + 3 sum_{l=3}^{alpha} C(alpha, l) q^l (1-q)^(alpha-l) e^((l-1) eps(l)) ],

taken with the unamplified eps(alpha) as a second bound (the subsampled
outputs are mixtures of the base mechanism's outputs, and Rényi divergence is
jointly quasi-convex). q = 1 is the unsampled mechanism. RDP composes
additively over steps; the conversion to (epsilon, delta) is Balle et al.
2020 (Theorem 21; Canonne, Kamath, Steinke 2020):

    epsilon = min_alpha  rdp(alpha) + log1p(-1/alpha) - (log delta + log alpha) / (alpha - 1).

Every value here is an upper bound on the true epsilon. The ``3`` of the
general bound costs a ``log(3) / (alpha - 1)`` per step once the sampled
records per order are many; over hundreds of steps that dominates, which is why
privfer's distributed default is full participation (q = 1) — see
docs/privacy-accounting.md.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln, logsumexp

AMPLIFIED_ORDERS: tuple[int, ...] = tuple(range(2, 257))  # contiguous: Zhu & Wang's bound at alpha needs eps(2..alpha)
ORDERS: tuple[int, ...] = AMPLIFIED_ORDERS + (320, 384, 512, 768, 1024)  # the last ones unamplified (sound)
MAX_STEPS = 10_000_000  # a ledger or config asking for more is refused before any work


def _log_binomials(alpha: int) -> np.ndarray:
    l = np.arange(alpha + 1, dtype=np.float64)
    return gammaln(alpha + 1) - gammaln(l + 1) - gammaln(alpha - l + 1)


def subsampled_rdp(orders: tuple[int, ...], sample_rate: float, base: np.ndarray) -> np.ndarray:
    """Zhu & Wang's general Poisson-subsampling bound (Theorem 6), capped by the unsampled RDP ``base``.

    ``base[i]`` is the base mechanism's RDP at ``orders[i]`` (integers >= 2); the
    bound needs eps(l) for every l <= alpha, so ``orders`` must contain 2..max.
    """
    q = float(sample_rate)
    if not 0 < q <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {q}")
    base = np.asarray(base, dtype=np.float64)
    if q == 1.0:
        return base.copy()
    index = {int(a): i for i, a in enumerate(orders)}
    out = np.empty(len(orders))
    log_q, log_1q = math.log(q), math.log1p(-q)
    for i, alpha in enumerate(orders):
        alpha = int(alpha)
        missing = [l for l in range(2, alpha + 1) if l not in index]
        if missing:
            # Orders above the contiguous range use the base RDP's closed form through the caller;
            # here they fall back to the (sound) unamplified value.
            out[i] = base[i]
            continue
        ls = np.arange(3, alpha + 1)
        logc = _log_binomials(alpha)
        eps_l = base[[index[l] for l in ls]] if len(ls) else np.zeros(0)
        terms = [
            (alpha - 1) * log_1q + math.log(alpha * q - q + 1),
            logc[2] + 2 * log_q + (alpha - 2) * log_1q + base[index[2]],
        ]
        if len(ls):
            terms.extend(math.log(3) + logc[3:] + ls * log_q + (alpha - ls) * log_1q + (ls - 1) * eps_l)
        out[i] = min(float(logsumexp(terms)) / (alpha - 1), float(base[i]))
    return out


def rdp_to_epsilon(orders: tuple[int, ...], rdp: np.ndarray, delta: float) -> tuple[float, int]:
    """(epsilon, best order) from RDP values (Balle et al. 2020's conversion, as Opacus and dp-accounting)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(orders, dtype=np.float64)
    eps = np.asarray(rdp) + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    eps = np.where(np.isfinite(eps), eps, np.inf)
    best = int(np.argmin(eps))
    return max(float(eps[best]), 0.0), int(orders[best])


__all__ = ["AMPLIFIED_ORDERS", "MAX_STEPS", "ORDERS", "rdp_to_epsilon", "subsampled_rdp"]
