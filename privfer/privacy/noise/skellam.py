"""The Skellam family: each share Skellam(variance), the difference of two Poisson(variance / 2) draws.

Base mechanism (Agarwal, Kairouz, Liu, NeurIPS 2021, "The Skellam Mechanism
for Differentially Private Federated Learning", Theorem 3.5 with Corollary
3.6): adding Skellam noise of variance ``mu`` to every coordinate of an
integer vector whose L1 / L2 sensitivities are ``l1`` / ``l2`` satisfies
(alpha, eps(alpha))-RDP with

    eps(alpha) = alpha l2^2 / (2 mu) + min(((2 alpha - 1) l2^2 + 6 l1) / (4 mu^2), 3 l1 / (2 mu)).

A sum of independent Skellam variables is Skellam (variances add), so the
shares of the clients add up to exactly this mechanism, however many there are.
"""

from __future__ import annotations

import math

import numpy as np

from privfer.privacy.noise.base import TAIL_FAILURE, NoiseFamily


class Skellam(NoiseFamily):
    name = "skellam"
    title = "Skellam"
    accountant = "skellam_rdp"
    accounting = (
        "Skellam RDP (Agarwal, Kairouz, Liu 2021, Thm 3.5) of the sum's noise with the rounded sensitivities, "
        "amplified by Poisson subsampling with Zhu & Wang 2019's general bound (Thm 6) when sample_rate < 1, "
        "composed over steps, converted with Balle et al. 2020 (Thm 21)"
    )

    def sample(self, rng: np.random.Generator, variance: float, size: int) -> np.ndarray:
        if not variance > 0:
            raise ValueError("the Skellam variance must be positive")
        half = variance / 2
        return rng.poisson(half, size).astype(np.int64) - rng.poisson(half, size).astype(np.int64)

    def base_rdp(self, orders: np.ndarray, l1: float, l2: float, mu: float, shares: int,
                 dimension: int) -> np.ndarray:
        if not (mu > 0 and l2 > 0 and l1 > 0):
            raise ValueError("the Skellam variance and both sensitivities must be positive")
        a = np.asarray(orders, dtype=np.float64)
        extra = np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))
        return a * l2**2 / (2 * mu) + extra

    def independent_base_rdp(self, alpha: int, l1: float, l2: float, mu: float, shares: int,
                             dimension: int) -> float:
        leading = alpha * l2 * l2 / (2 * mu)
        return leading + min(((2 * alpha - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l1 / (2 * mu))

    def tail_bound(self, variance: float, coordinates: float, failure: float = TAIL_FAILURE) -> float:
        """A Skellam variable is a sum of centred Poisson variables, for which Bernstein's inequality gives
        P(|X| >= t) <= 2 exp(-t^2 / (2 (v + t / 3))); solve for t after a union bound over the coordinates."""
        log_term = math.log(2 * coordinates / failure)
        return log_term / 3 + math.sqrt((log_term / 3) ** 2 + 2 * variance * log_term)


__all__ = ["Skellam"]
