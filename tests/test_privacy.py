"""Noise calibration, the per-client DP-SGD wrapper and accountant persistence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from privfer.fl.client import FLClient, LocalTraining
from privfer.models.loss import LabelLoss, label_loss
from privfer.models.vfer import VFER
from privfer.privacy.calibrate import (
    EPSILON_TOLERANCE,
    PrivacyBudgetError,
    calibrate_noise,
    default_delta,
    epsilon_spent,
    plan_clients,
    steps_per_epoch,
)
from tests.conftest import small_config


@pytest.mark.parametrize(
    ("accountant", "epsilon", "rate", "steps"),
    [("rdp", 3.0, 1 / 3, 60), ("rdp", 1.0, 0.25, 12), ("rdp", 8.0, 0.5, 200), ("prv", 3.0, 1 / 3, 60)],
)
def test_calibrated_noise_spends_the_budget_without_exceeding_it(accountant, epsilon, rate, steps):
    sigma = calibrate_noise(epsilon, 1e-3, rate, steps, accountant)
    spent = epsilon_spent([(sigma, rate, steps)], 1e-3, accountant)
    assert epsilon - EPSILON_TOLERANCE - 1e-9 <= spent <= epsilon
    assert epsilon_spent([(sigma * 0.97, rate, steps)], 1e-3, accountant) > spent  # less noise would spend more


def test_accountants_agree_with_the_published_cross_check_values():
    # REFERENCES.md: q = 0.01, sigma = 1.0, 1000 steps, delta = 1e-5 -> RDP 2.101, PLD / PRV about 1.83.
    assert epsilon_spent([(1.0, 0.01, 1000)], 1e-5, "rdp") == pytest.approx(2.101, abs=0.01)
    assert epsilon_spent([(1.0, 0.01, 1000)], 1e-5, "prv") == pytest.approx(1.83, abs=0.05)


def test_a_huge_budget_with_one_full_batch_step_is_reachable_with_prv():
    # PRV cannot evaluate the tiny noise RDP suggests here (its discretization check fails): look higher.
    sigma = calibrate_noise(1000.0, 1 / 820, 1.0, 1, "prv")
    assert 0 < sigma < 1 and epsilon_spent([(sigma, 1.0, 1)], 1 / 820, "prv") <= 1000.0


def test_an_unreachable_budget_is_a_clear_error_with_the_numbers():
    with pytest.raises(PrivacyBudgetError) as caught:
        calibrate_noise(0.05, 1e-5, 1.0, 500, "prv", max_noise_multiplier=20, records=12)
    message = str(caught.value)
    for part in ("epsilon 0.05", "delta 1e-05", "12 records", "500 steps", "privacy.max_noise_multiplier"):
        assert part in message


def test_the_plan_counts_steps_and_sample_rate_as_opacus_records_them():
    import warnings

    from opacus.data_loader import DPDataLoader

    for records, batch in ((372, 4), (82, 32), (396, 4)):  # 93 and 99 batches: Opacus's float round trip
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(records, 1)), batch_size=batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recorded = len(DPDataLoader.from_data_loader(loader))
        assert steps_per_epoch(records, batch) == recorded
    assert steps_per_epoch(372, 4) == 92


def test_client_plans_follow_opacus_poisson_loader_and_worst_case_participation():
    plans = plan_clients({1: 82, 2: 64, 3: 65}, epsilon=3.0, delta=1e-3, batch_size=32, rounds=5, local_epochs=2,
                         accountant="rdp")
    assert [steps_per_epoch(n, 32) for n in (82, 64, 65)] == [3, 2, 3]
    assert plans[1].sample_rate == pytest.approx(1 / 3) and plans[1].max_steps == 5 * 2 * 3
    assert plans[2].sample_rate == pytest.approx(1 / 2) and plans[2].max_steps == 5 * 2 * 2
    assert plans[1].noise_multiplier == plans[3].noise_multiplier  # same (q, steps), same noise
    for plan in plans.values():
        spent = epsilon_spent([(plan.noise_multiplier, plan.sample_rate, plan.max_steps)], 1e-3, "rdp")
        assert 0.9 * 3.0 <= spent <= 3.0
    assert all(p.noise_multiplier is None for p in plan_clients(
        {1: 10}, epsilon=math.inf, delta=1e-3, batch_size=4, rounds=2, local_epochs=1).values())
    assert default_delta([82, 90, 10]) == pytest.approx(1 / 900)


def test_known_noise_multipliers_are_checked_not_searched_again():
    common = dict(epsilon=3.0, delta=1e-3, batch_size=32, rounds=5, local_epochs=2, accountant="rdp")
    calibrated = plan_clients({1: 82}, **common)[1].noise_multiplier
    again = plan_clients({1: 82}, known_noise={1: calibrated}, **common)[1]
    assert again.noise_multiplier == calibrated
    more = plan_clients({1: 82}, known_noise={1: calibrated * 1.5}, **common)[1]  # more noise: within the budget
    assert more.noise_multiplier == calibrated * 1.5
    for too_little in (calibrated * 0.8, 0.0):
        with pytest.raises(PrivacyBudgetError, match="recalibrate"):
            plan_clients({1: 82}, known_noise={1: too_little}, **common)


@pytest.mark.parametrize("discrete", [False, True])
def test_label_loss_module_matches_the_training_loss(discrete):
    torch.manual_seed(0)
    logits = torch.randn(7, 6)
    targets = torch.randint(0, 6, (7,)) if discrete else torch.softmax(torch.randn(7, 6), dim=1)
    criterion = LabelLoss()
    torch.testing.assert_close(criterion(logits, targets), label_loss(logits, targets))
    criterion.reduction = "none"
    per_clip = criterion(logits, targets)
    assert per_clip.shape == (7,)
    torch.testing.assert_close(per_clip.mean(), label_loss(logits, targets))


def make_client(n=20, t=4, d=6):
    rng = np.random.default_rng(0)
    targets = rng.dirichlet(np.ones(6), size=n).astype(np.float32)
    return FLClient(5, rng.normal(size=(n, t, d)).astype(np.float32), targets)


def test_a_clients_accountant_composes_over_the_rounds_it_trains_in():
    config = small_config("model.hidden_size=4")
    client = make_client()
    model = VFER.from_config(config.model, 6, private=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = LocalTraining(lr=1e-3, epochs=2, batch_size=8, noise_multiplier=1.1, accountant="rdp")
    history: list = []
    for round_index in range(3):
        update = client.fit(config, state, list(state), plan, history=history, seed=round_index)
        history = update.history
        assert update.steps == 2 * steps_per_epoch(20, 8)
    assert history == [(1.1, 1 / 3, 18)]
    assert set(update.delta) == set(state) and update.personal == {}


def test_local_training_is_reproducible_from_its_seed_and_changes_with_it():
    config = small_config("model.hidden_size=4")
    client = make_client()
    state = {k: v.detach().clone() for k, v in VFER.from_config(config.model, 6, private=True).state_dict().items()}
    plan = LocalTraining(lr=1e-2, epochs=1, batch_size=8, noise_multiplier=1.0, accountant="rdp")
    first = client.fit(config, state, list(state), plan, seed=1)
    again = client.fit(config, state, list(state), plan, seed=1)
    other = client.fit(config, state, list(state), plan, seed=2)
    assert all(torch.equal(first.delta[k], again.delta[k]) for k in state)
    assert any(not torch.equal(first.delta[k], other.delta[k]) for k in state)
    secure = LocalTraining(lr=1e-2, epochs=1, batch_size=8, noise_multiplier=1.0, accountant="rdp", noise_source="os")
    one, two = (client.fit(config, state, list(state), secure, seed=1) for _ in range(2))
    assert any(not torch.equal(one.delta[k], two.delta[k]) for k in state)  # OS-seeded noise differs every time
