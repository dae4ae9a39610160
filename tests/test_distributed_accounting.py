"""The Skellam accountant and the distributed plan: published arithmetic, soundness against the Gaussian, sizing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privfer.errors import ConfigError
from privfer.privacy.audit.distributed import _gaussian_floor, independent_epsilon
from privfer.privacy.calibrate import PrivacyBudgetError
from privfer.privacy.distributed import (
    calibrate_distributed,
    colluders,
    min_inputs,
    rounding_scale,
    sensitivities,
)
from privfer.privacy.noise import NoiseSteps, noise_family
from privfer.privacy.rdp import ORDERS, subsampled_rdp

SKELLAM = noise_family("skellam")


@pytest.mark.parametrize(
    "alpha, l1, l2_squared, mu, expected",
    [(2, 1, 1, 1, 2.5), (10, 100, 100, 50, 10.25), (8, 37, 37, 1000, 0.14819425), (32, 1000, 1000, 1e4, 1.6001725)],
)
def test_skellam_rdp_matches_agarwal_et_al(alpha, l1, l2_squared, mu, expected):
    # eps(a) = a D2^2 / (2 mu) + min(((2a - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu)), evaluated by hand
    assert SKELLAM.base_rdp(np.array([alpha]), l1, math.sqrt(l2_squared), mu, 1, 1)[0] == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize(
    "mu, l1, l2, q, steps, expected, order",
    [
        # google-research/federated distributed_dp/accounting_utils.py's skellam_epsilon arithmetic (scale 1,
        # central stddev 100, l2 10, dim 100, no rounding), at delta 1e-5
        (1e4, 100, 10, 1.0, 1, 0.3753129723662765, 41),
        (1e4, 100, 10, 0.01, 1000, 0.48437506549863274, 26),
    ],
)
def test_skellam_epsilon_matches_the_reference_arithmetic(mu, l1, l2, q, steps, expected, order):
    epsilon, best = SKELLAM.epsilon([NoiseSteps(mu, l1, l2, q, steps)], 1e-5)
    assert epsilon == pytest.approx(expected, rel=1e-9)
    assert best == order


@pytest.mark.parametrize("q, sigma, steps", [(1.0, 2.0, 10), (1.0, 8.0, 40), (0.05, 1.2, 100), (0.2, 3.0, 50),
                                             (0.01, 0.9, 1000)])
def test_never_below_the_gaussian_with_the_same_variance(q, sigma, steps):
    scale, d = 2.0**16, 10_000
    l1, l2 = sensitivities(1.0, scale, d)
    mu = (sigma * l2) ** 2
    skellam = SKELLAM.epsilon([NoiseSteps(mu, l1, l2, q, steps)], 1e-5)[0]
    assert skellam >= _gaussian_floor(sigma, q, steps, 1e-5) - 1e-9


def test_converges_to_the_gaussian_as_the_variance_grows():
    # Unsampled: with the noise multiplier fixed and the integer scale growing, the Skellam RDP's extra term
    # vanishes and its epsilon approaches the Gaussian mechanism's RDP epsilon (Opacus RDP, same orders).
    from privfer.privacy.calibrate import epsilon_spent

    gaussian = epsilon_spent([(4.0, 1.0, 20)], 1e-5, "rdp")
    gaps = []
    for scale in (2.0**2, 2.0**6, 2.0**12, 2.0**20):
        l2 = scale  # no rounding term: the sensitivity is exactly C x scale
        l1 = l2 * min(math.sqrt(1000), l2)
        gaps.append(SKELLAM.epsilon([NoiseSteps((4.0 * l2) ** 2, l1, l2, 1.0, 20)], 1e-5)[0] - gaussian)
    assert all(g >= -1e-9 for g in gaps)
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-4 and gaps[0] > 1e-2


def test_subsampling_never_hurts_and_composition_adds():
    base = SKELLAM.base_rdp(np.array(ORDERS), 1e6, 1e4, 1e9, 1, 1)
    sampled = subsampled_rdp(ORDERS, 0.1, base)
    assert np.all(sampled <= base + 1e-15)
    one = NoiseSteps(1e9, 1e6, 1e4, 0.1, 10)
    assert SKELLAM.epsilon([one, one], 1e-5)[0] == pytest.approx(
        SKELLAM.epsilon([NoiseSteps(1e9, 1e6, 1e4, 0.1, 20)], 1e-5)[0])


@pytest.mark.parametrize("q", [1.0, 0.03])
def test_two_implementations_agree(q):
    l1, l2 = sensitivities(1.0, 2.0**14, 5000)
    mu = (3.0 * l2) ** 2
    mine = SKELLAM.epsilon([NoiseSteps(mu, l1, l2, q, 30)], 1e-6)[0]
    assert independent_epsilon(SKELLAM, mu, l1, l2, q, 30, 1e-6) == pytest.approx(mine, rel=1e-9, abs=1e-9)


def test_sensitivity_and_scale_arithmetic():
    scale = rounding_scale(1.0, 198_406, 0.01)
    assert scale == 2.0**16 and math.sqrt(198_406) / scale <= 0.01 < math.sqrt(198_406) / (scale / 2)
    l1, l2 = sensitivities(0.5, 1024.0, 100)
    assert l2 == 512 + 10 and l1 == min(10 * l2, l2 * l2)
    assert (min_inputs(67, 0.9), colluders(67, 0.1)) == (61, 6)
    assert (min_inputs(10, 0.9), colluders(10, 0.1)) == (9, 1)


def test_tail_bound_holds_empirically():
    rng = np.random.default_rng(0)
    draws = rng.poisson(50.0, 200_000) - rng.poisson(50.0, 200_000)
    assert np.abs(draws).max() <= SKELLAM.tail_bound(100.0, 200_000, failure=1e-3)


def _plan(**overrides):
    settings = dict(epsilon=3.0, delta=1e-5, max_grad_norm=1.0, dimension=20_000, sample_rate=1.0, steps=40,
                    clients=50, records=4000, min_inputs_fraction=0.9, colluding_fraction=0.1,
                    rounding_overhead=0.01, modulus_bits=32, max_noise_multiplier=50.0)
    settings.update(overrides)
    return calibrate_distributed(**settings)


@pytest.mark.parametrize("epsilon", [0.5, 3.0, 8.0, 50.0])
def test_calibration_meets_the_budget_tightly(epsilon):
    plan = _plan(epsilon=epsilon)
    spent = plan.epsilon()
    assert 0.9 * epsilon <= spent <= epsilon
    assert plan.share_variance * plan.honest == pytest.approx(plan.mu)
    assert plan.honest == min_inputs(50, 0.9) - colluders(50, 0.1)


def test_more_noise_for_a_tighter_budget_and_more_steps():
    assert _plan(epsilon=1.0).noise_multiplier > _plan(epsilon=3.0).noise_multiplier
    assert _plan(steps=80).noise_multiplier > _plan(steps=40).noise_multiplier


def test_bad_settings_are_refused_with_the_field_named():
    with pytest.raises(PrivacyBudgetError, match="max_noise_multiplier"):
        _plan(epsilon=0.01, max_noise_multiplier=2.0)
    with pytest.raises(ConfigError, match="modulus_bits"):
        _plan(records=10_000_000)
    with pytest.raises(ConfigError, match="honest"):
        _plan(min_inputs_fraction=0.05, colluding_fraction=0.4, clients=10)
    assert _plan(records=10_000_000, modulus_bits=64).modulus_bits == 64


def test_absurd_budgets_end_fast():
    import time

    started = time.perf_counter()
    plan = _plan(epsilon=1e12)
    assert plan.noise_multiplier <= 1e-3 + 1e-12
    with pytest.raises(ConfigError):
        _plan(epsilon=float("inf"))
    assert time.perf_counter() - started < 5
