"""The distributed discrete Gaussian (Kairouz, Liu, Steinke 2021) as a noise family: its draws, its sum, its bound."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import chi_square_p, small_config
from privfer.config import AggregationConfig
from privfer.errors import ConfigError
from privfer.fl.aggregation import sum_integer_contributions
from privfer.fl.simulation import simulate
from privfer.auditing import audit_path
from privfer.privacy.audit import MISMATCH
from privfer.privacy.audit.distributed import _gaussian_floor, independent_epsilon
from privfer.privacy.distributed import calibrate_distributed, encode_contribution, noise_generator
from privfer.privacy.noise import NoiseSteps, noise_family

DGAUSS = noise_family("discrete_gaussian")
SKELLAM = noise_family("skellam")


def exact_pmf(sigma2: float, half_width: int) -> np.ndarray:
    """N_Z(0, sigma2) on -half_width..half_width, normalised over a support wide enough to hold all its mass."""
    support = np.arange(-half_width, half_width + 1)
    weights = np.exp(-support.astype(np.float64) ** 2 / (2 * sigma2))
    return weights / weights.sum()


@pytest.mark.parametrize("sigma2", [0.3, 2.5, 40.0])
def test_draws_follow_the_discrete_gaussian(sigma2):
    half = int(12 * math.sqrt(sigma2)) + 3
    support = np.arange(-half, half + 1)
    pmf = exact_pmf(sigma2, half)
    draws = DGAUSS.sample(noise_generator(b"\x01" * 32), sigma2, 200_000)
    assert draws.dtype == np.int64
    assert chi_square_p(draws, support, pmf) > 1e-4
    if sigma2 < 10:  # the test has the power to tell the families apart where they differ: Skellam fails it
        other = SKELLAM.sample(noise_generator(b"\x02" * 32), float(np.dot(support**2, pmf)), 200_000)
        assert chi_square_p(other, support, pmf) < 1e-6


def test_large_shares_have_the_claimed_variance():
    draws = DGAUSS.sample(noise_generator(b"\x03" * 32), 1e10, 200_000)
    assert abs(draws.mean()) < 5 * math.sqrt(1e10 / draws.size)
    assert draws.var() == pytest.approx(1e10, rel=5 * math.sqrt(2 / draws.size))


def _plan(**extra):
    settings = dict(epsilon=40.0, delta=1e-5, max_grad_norm=0.05, dimension=3000, sample_rate=1.0, steps=5,
                    clients=5, records=200, min_inputs_fraction=0.8, colluding_fraction=0.2, rounding_overhead=1.0,
                    modulus_bits=32, max_noise_multiplier=50.0, noise="discrete_gaussian")
    settings.update(extra)
    return calibrate_distributed(**settings)


def test_the_unmasked_noise_is_the_sum_of_the_included_discrete_gaussian_shares():
    # Zero gradients through the real masking protocol, one client dropping: what the server unmasks is the sum of
    # four shares N_Z(0, share_variance), whose pmf is the four-fold convolution of the share's.
    plan = _plan()
    assert plan.noise == "discrete_gaussian" and plan.share_variance < 5000
    samples = []
    for round_index in range(4):
        contributions = {c: encode_contribution(np.zeros(plan.dimension), plan, noise_generator())
                         for c in range(1, 6)}
        summed = sum_integer_contributions(contributions, {3: "masked_input"}, AggregationConfig(), plan,
                                           round_id=f"dg{round_index}")
        assert summed.aborted is None and len(summed.included) == 4
        samples.append(summed.total)
    values = np.concatenate(samples)
    half = int(12 * math.sqrt(plan.share_variance)) + 3
    share = exact_pmf(plan.share_variance, half)
    pmf = share
    for _ in range(3):
        pmf = np.convolve(pmf, share)
    support = np.arange(-4 * half, 4 * half + 1)
    assert chi_square_p(values, support, pmf) > 1e-4
    assert values.var() == pytest.approx(4 * plan.share_variance, rel=5 * math.sqrt(2 / values.size))


@pytest.mark.parametrize("alpha, l1, l2, mu, shares, dimension, expected", [
    # Kairouz, Liu, Steinke 2021, Prop. 14, evaluated by hand: sigma^2 = mu / n, tau = 10 sum_k exp(-2 pi^2 sigma^2
    # k / (k + 1)); the three terms at (alpha, l1, l2, n sigma^2, d); expected = the smallest.
    # n = 1: tau = 0, the discrete Gaussian's alpha l2^2 / (2 sigma^2) = 4 * 25 / 24
    (4, 10.0, 5.0, 12.0, 1, 10, 4 * 25 / 24),
    # n = 3, sigma^2 = 0.3: tau = 10 (e^-2.96088 + e^-3.94784) = 0.7106957, the three terms written out below
    (4, 10.0, 3.0, 0.9, 3, 10, None),
    # sigma large: tau underflows to 0 and the bound is the Gaussian's, 8 * 1e4 / (2 * 1e6) = 0.04
    (8, 1e3, 1e2, 1e6, 50, 10**6, 0.04),
])
def test_the_rdp_is_kairouz_liu_steinke_proposition_14(alpha, l1, l2, mu, shares, dimension, expected):
    if expected is None:  # the n = 3 case, each term written out
        tau = 10 * (math.exp(-2 * math.pi**2 * 0.3 * 1 / 2) + math.exp(-2 * math.pi**2 * 0.3 * 2 / 3))
        assert tau == pytest.approx(0.7106957, rel=1e-5)
        root = math.sqrt(3 * 0.3)
        expected = min(alpha / 2 * (l2 / root) ** 2 + tau * dimension,
                       alpha / 2 * ((l2 / root) ** 2 + 2 * (l1 / root) * tau + tau**2 * dimension),
                       alpha / 2 * (l2 / root + math.sqrt(dimension) * tau) ** 2)
    got = DGAUSS.base_rdp(np.array([alpha]), l1, l2, mu, shares, dimension)[0]
    assert got == pytest.approx(expected, rel=1e-9)
    assert DGAUSS.independent_base_rdp(alpha, l1, l2, mu, shares, dimension) == pytest.approx(expected, rel=1e-9)


def test_a_share_below_sigma_one_half_is_refused():
    with pytest.raises(ValueError, match="sigma >= 1/2"):
        DGAUSS.base_rdp(np.array([2]), 1.0, 1.0, 0.2, 1, 1)
    with pytest.raises(ValueError, match="sigma >= 1/2"):
        DGAUSS.parse_entry([1.0, 1.0, 1.0, 1.0, 8, 100, 3])  # eight shares of total variance 1


@pytest.mark.parametrize("multiplier, q, steps", [(0.8, 1.0, 10), (2.0, 1.0, 40), (1.2, 0.3, 50), (4.0, 0.05, 200)])
def test_never_below_the_gaussian_with_the_same_variance_and_never_above_skellam(multiplier, q, steps):
    l2 = 2000.0
    l1 = l2 * l2
    mu = (multiplier * l2) ** 2
    step = DGAUSS.steps(mu, l1, l2, q, steps, 20, 83_000)
    epsilon = DGAUSS.epsilon([step], 1e-5)[0]
    assert epsilon >= _gaussian_floor(multiplier, q, steps, 1e-5) - 1e-6  # dp-accounting PLD, near exact
    assert epsilon <= SKELLAM.epsilon([SKELLAM.steps(mu, l1, l2, q, steps, 20, 83_000)], 1e-5)[0] + 1e-12
    assert independent_epsilon(DGAUSS, mu, l1, l2, q, steps, 1e-5, 20, 83_000) == pytest.approx(epsilon, rel=1e-9)


def test_calibration_meets_the_budget_with_no_more_noise_than_skellam():
    common = dict(epsilon=3.0, delta=1e-5, max_grad_norm=1.0, dimension=83_000, sample_rate=1.0, steps=40,
                  clients=67, records=700, min_inputs_fraction=0.9, colluding_fraction=0.1, rounding_overhead=0.01,
                  modulus_bits=64, max_noise_multiplier=50.0)
    dgauss = calibrate_distributed(**common, noise="discrete_gaussian")
    skellam = calibrate_distributed(**common, noise="skellam")
    assert 0.99 * 3.0 - 0.02 <= dgauss.epsilon() <= 3.0
    assert dgauss.mu <= skellam.mu
    assert dgauss.steps_entry(1).shares == dgauss.honest and dgauss.steps_entry(1).dimension == 83_000


FAST = ["federation.rounds=4", "federation.adaptation=false", "privacy.epsilon=3", "privacy.noise=discrete_gaussian"]


@pytest.mark.parametrize("unit", ["record", "person"])
def test_a_run_with_discrete_gaussian_noise_is_audited_and_a_forged_share_count_is_caught(tmp_path, small_clips, unit):
    config = small_config(*FAST, f"privacy.unit={unit}")
    result = simulate(config, tmp_path / "run", clips=small_clips)
    assert result.privacy.accountant == "ddgauss_rdp"
    ledger = json.loads((tmp_path / "run" / "privacy_ledger.json").read_text())
    assert ledger["noise"] == "discrete_gaussian" and ledger["phases"]["training"]["noise"] == "discrete_gaussian"
    assert "discrete Gaussian noise shares" in ledger["mechanism"]
    for entry in ledger["clients"]:
        assert entry["epsilon"] <= 3.0
        assert len(entry["history"][0]) == len(DGAUSS.fields)
    report = audit_path(tmp_path / "run")
    assert report.passed, ([c.reasons for c in report.clients if c.reasons], report.run_checks)
    assert set(report.clients[0].values) == {"ddgauss_rdp", "ddgauss_rdp_independent"}

    from privfer.privacy.audit import LedgerError

    forged = json.loads((tmp_path / "run" / "privacy_ledger.json").read_text())
    at = DGAUSS.fields.index("shares")
    forged["clients"][0]["history"][0][at] *= 10  # more shares than the plan's honest ones: a smaller tau claimed
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    with pytest.raises(LedgerError, match="guarantees"):  # refused before any accountant runs
        audit_path(tmp_path / "forged.json")

    stripped = json.loads((tmp_path / "run" / "privacy_ledger.json").read_text())
    stripped["clients"][0]["epsilon"] = 0.5
    (tmp_path / "claimed.json").write_text(json.dumps(stripped))
    assert MISMATCH in audit_path(tmp_path / "claimed.json").clients[0].verdicts

    relabelled = json.loads((tmp_path / "run" / "privacy_ledger.json").read_text())
    relabelled["noise"] = "skellam"  # the same numbers read as the other family
    relabelled["phases"]["training"]["noise"] = "skellam"
    (tmp_path / "relabelled.json").write_text(json.dumps(relabelled))
    with pytest.raises(LedgerError, match="accountant"):
        audit_path(tmp_path / "relabelled.json")

    # a consistent rewrite as a Skellam ledger (no 'noise' field: read as a legacy one) recomputes on its own, but
    # the run's config says which family ran
    legacy = json.loads((tmp_path / "run" / "privacy_ledger.json").read_text())
    del legacy["noise"], legacy["phases"]["training"]["noise"], legacy["accounting"]
    legacy["accountant"] = "skellam_rdp"
    from privfer.privacy.mechanisms import MECHANISMS

    legacy.update(MECHANISMS[legacy["mechanism_id"]].ledger_statement(noise=SKELLAM.title))  # its sentences too
    for entry in legacy["clients"]:
        step = DGAUSS.parse_entry(entry["history"][0])
        entry["history"] = [SKELLAM.entry(step)]
        entry["epsilon"], entry["accountant"] = SKELLAM.epsilon([step], entry["delta"])[0], "skellam_rdp"
    (tmp_path / "run" / "privacy_ledger.json").write_text(json.dumps(legacy))
    report = audit_path(tmp_path / "run")
    assert any("noise family" in problem for problem in report.run_checks) and not report.passed


def test_a_small_model_calibrates_with_shares_of_at_least_sigma_one_half():
    # with d = 1 and 100 clients the least noise multiplier would give shares below sigma = 1/2, where the bound
    # does not hold: the search starts where it does
    plan = calibrate_distributed(epsilon=50.0, delta=1e-5, max_grad_norm=1.0, dimension=1, sample_rate=1.0, steps=5,
                                 clients=100, records=100, min_inputs_fraction=0.9, colluding_fraction=0.1,
                                 rounding_overhead=0.01, modulus_bits=64, max_noise_multiplier=50.0,
                                 noise="discrete_gaussian")
    assert plan.mu / plan.honest >= 0.25 and plan.epsilon() <= 50.0


def test_local_dp_refuses_a_noise_family():
    with pytest.raises(ConfigError, match="privacy.noise 'discrete_gaussian'"):
        small_config("privacy.epsilon=3", "aggregation.backend=ckks", "privacy.noise=discrete_gaussian")
    with pytest.raises(ConfigError, match="privacy.noise"):
        small_config("privacy.noise=gaussian")


def test_a_flower_node_keeps_one_family_per_ledger(tmp_path):
    pytest.importorskip("flwr")
    from privfer.privacy.node import NodeLedgerError, NodePrivacy
    from privfer.privacy.node_ledger import NodeLedger

    policy = NodePrivacy(ledger=tmp_path / "node.json", lifetime_epsilon=8.0, delta=1e-6, noise="discrete_gaussian")
    ledger = NodeLedger(policy)
    step = DGAUSS.steps(1e8, 1e6, 1e3, 1.0, 1, 9, 5000)
    ledger.charge(step, "r1")
    ledger.charge(step, "r2")
    stored = json.loads((tmp_path / "node.json").read_text())
    assert stored["noise"] == "discrete_gaussian" and len(stored["history"]) == 1  # the two rounds merged
    assert DGAUSS.parse_entry(stored["history"][0]) == NoiseSteps(1e8, 1e6, 1e3, 1.0, 2, 9, 5000)
    assert ledger.spent() == pytest.approx(DGAUSS.epsilon([DGAUSS.steps(1e8, 1e6, 1e3, 1.0, 2, 9, 5000)], 1e-6)[0])
    with pytest.raises(NodeLedgerError, match="one noise family"):
        NodeLedger(NodePrivacy(ledger=tmp_path / "node.json", lifetime_epsilon=8.0, delta=1e-6)).spent()
