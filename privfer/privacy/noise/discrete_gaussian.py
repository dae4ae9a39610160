"""The distributed discrete Gaussian (Kairouz, Liu, Steinke, ICML 2021): each share N_Z(0, sigma^2) on the integers.

The discrete Gaussian N_Z(0, sigma^2) puts mass proportional to
exp(-x^2 / (2 sigma^2)) on each integer x. Unlike Skellam, a sum of discrete
Gaussians is not a discrete Gaussian; Kairouz, Liu and Steinke bound how far
from one it is. With n independent shares N_Z(0, sigma^2), sigma >= 1/2,

    tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)),

adding their sum to each of the d coordinates of an integer vector whose
L1 / L2 sensitivities are l1 / l2 satisfies (alpha, eps(alpha))-RDP for every
alpha > 1 with (their Proposition 14, the RDP form of Theorem 1)

    eps(alpha) = min( alpha/2 * l2^2 / (n sigma^2) + tau d,
                      alpha/2 * (l2^2 / (n sigma^2) + 2 l1 tau / (sqrt(n) sigma) + tau^2 d),
                      alpha/2 * (l2 / (sqrt(n) sigma) + tau sqrt(d))^2 ).

Here n sigma^2 = mu, the sum's variance, so the leading term is the Gaussian's
alpha l2^2 / (2 mu); tau vanishes like exp(-pi^2 sigma^2) — below 1e-300 for
every share privfer plans (sigma is in the thousands of integer units) — and
n = 1 gives exactly the discrete Gaussian's own bound (Canonne, Kamath, Steinke
2020). ``shares`` is the least number of honest shares any released sum holds
(min_inputs - colluders): more shares only add independent noise.

Sampling: Canonne, Kamath and Steinke's rejection sampler (2020, Algorithm 3):
draw Y from the discrete Laplace with scale t = floor(sigma) + 1 (the
difference of two geometric variables) and accept it with probability
exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2)); at least about half the draws are
accepted. The acceptance probabilities are computed in float64 (as in
TensorFlow Privacy's sampler), not in the paper's exact arithmetic; the
distribution's deviation is at the 2^-50 level and is not accounted.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from privfer.privacy.noise.base import TAIL_FAILURE, NoiseFamily

MAX_REJECTION_ROUNDS = 200  # each round keeps a coordinate with probability > 1/2: 2^-200 never happens


class DiscreteGaussian(NoiseFamily):
    name = "discrete_gaussian"
    title = "discrete Gaussian"
    accountant = "ddgauss_rdp"
    accounting = (
        "distributed discrete Gaussian RDP (Kairouz, Liu, Steinke 2021, Prop. 14) of the sum of the honest shares "
        "with the rounded sensitivities, amplified by Poisson subsampling with Zhu & Wang 2019's general bound "
        "(Thm 6) when sample_rate < 1, composed over steps, converted with Balle et al. 2020 (Thm 21)"
    )
    fields = ("mu", "l1", "l2", "sample_rate", "shares", "dimension", "steps")

    def sample(self, rng: np.random.Generator, variance: float, size: int) -> np.ndarray:
        if not (variance > 0 and math.isfinite(variance)):
            raise ValueError("the discrete Gaussian's variance must be positive and finite")
        sigma = math.sqrt(variance)
        t = math.floor(sigma) + 1
        p = -math.expm1(-1.0 / t)  # the geometric's success probability: P(G = k) = p (1 - p)^k, k >= 0
        out = np.empty(int(size), dtype=np.int64)
        pending = np.arange(int(size))
        for _ in range(MAX_REJECTION_ROUNDS):
            if not pending.size:
                return out
            y = rng.geometric(p, pending.size).astype(np.int64) - rng.geometric(p, pending.size).astype(np.int64)
            accept = rng.random(pending.size) < np.exp(-((np.abs(y) - variance / t) ** 2) / (2 * variance))
            out[pending[accept]] = y[accept]
            pending = pending[~accept]
        raise RuntimeError("the discrete Gaussian sampler rejected a draw 200 times in a row: its generator is broken")

    def min_mu(self, shares: int) -> float:
        """Prop. 14 needs sigma >= 1/2 for each share."""
        return 0.25 * shares

    def check_shares(self, mu: float, shares: int) -> None:
        if mu < self.min_mu(shares):
            raise ValueError(f"a discrete Gaussian share needs sigma >= 1/2 (Kairouz et al., Prop. 14); {shares} "
                             f"shares of total variance {mu:g} have sigma^2 = {mu / shares:g}")

    @staticmethod
    def tau(sigma2: float, shares: int) -> float:
        """Kairouz et al.'s tau for ``shares`` shares of variance ``sigma2``: how far their sum is from N_Z (one
        vector of at most MAX_SHARES terms)."""
        k = np.arange(1, shares, dtype=np.float64)
        return 10 * math.fsum(np.exp(-2 * math.pi**2 * sigma2 * k / (k + 1)).tolist())

    def base_rdp(self, orders: np.ndarray, l1: float, l2: float, mu: float, shares: int,
                 dimension: int) -> np.ndarray:
        if not (mu > 0 and l2 > 0 and l1 > 0):
            raise ValueError("the variance and both sensitivities must be positive")
        self.check_shares(mu, shares)
        tau = self.tau(mu / shares, shares)
        a = np.asarray(orders, dtype=np.float64) / 2
        scaled_l2, scaled_l1 = l2 / math.sqrt(mu), l1 / math.sqrt(mu)  # l / (sqrt(n) sigma)
        return np.minimum.reduce([
            a * scaled_l2**2 + tau * dimension,
            a * (scaled_l2**2 + 2 * scaled_l1 * tau + tau**2 * dimension),
            a * (scaled_l2 + math.sqrt(dimension) * tau) ** 2,
        ])

    def independent_base_rdp(self, alpha: int, l1: float, l2: float, mu: float, shares: int,
                             dimension: int) -> float:
        sigma2 = mu / shares
        tau = _loop_tau(sigma2, shares)
        root_n_sigma = math.sqrt(shares) * math.sqrt(sigma2)
        first = alpha / 2.0 * (l2 / root_n_sigma) ** 2 + tau * dimension
        second = alpha / 2.0 * ((l2 / root_n_sigma) ** 2 + 2.0 * (l1 / root_n_sigma) * tau + tau * tau * dimension)
        third = alpha / 2.0 * (l2 / root_n_sigma + math.sqrt(dimension) * tau) ** 2
        return min(first, second, third)

    def tail_bound(self, variance: float, coordinates: float, failure: float = TAIL_FAILURE) -> float:
        """A discrete Gaussian N_Z(0, s^2) is sub-Gaussian with variance proxy s^2 (Canonne, Kamath, Steinke 2020,
        Corollary 9), so a sum of independent shares of total variance v has P(|X| >= t) <= 2 exp(-t^2 / (2 v));
        solve for t after a union bound over the coordinates."""
        return math.sqrt(2 * variance * math.log(2 * coordinates / failure))


@lru_cache(maxsize=64)
def _loop_tau(sigma2: float, shares: int) -> float:
    """tau again, term by term in plain floats (the audit's second implementation); once per (sigma^2, shares)."""
    tau = 0.0
    for k in range(1, shares):
        term = math.exp(-2.0 * math.pi * math.pi * sigma2 * (k / (k + 1.0)))
        if term == 0.0:  # the terms decrease in k: every later one underflows too
            break
        tau += term
    return 10.0 * tau


__all__ = ["DiscreteGaussian"]
