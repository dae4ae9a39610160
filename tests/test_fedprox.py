"""FedProx (Li et al., MLSys 2020) as one strategy file: its proximal term, where it runs and where it is refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import small_config
from privfer.config import load_config
from privfer.errors import ConfigError
from privfer.fl.batched import fit_clients
from privfer.fl.client import FLClient, LocalTraining
from privfer.fl.simulation import prepare_federation, simulate
from privfer.fl.strategies import STRATEGIES, make_strategy
from privfer.models.vfer import VFER
from privfer.auditing import audit_path
from privfer.models.loss import LabelLoss


def _client(n=12, frames=6, dim=12, seed=0, client_id=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, frames, dim)).astype(np.float32)
    votes = rng.integers(0, 4, size=(n, 6)).astype(np.float32)
    votes[:, seed % 6] += 3
    return FLClient(client_id, x, votes / votes.sum(axis=1, keepdims=True))


def _setup(*overrides):
    config = load_config(None, ["data.frames=6", "data.feature_dim=12", "model.hidden_size=5", "privacy.mechanism=local",
                                *overrides])
    torch.manual_seed(3)
    state = {k: v.clone() for k, v in VFER.from_config(config.model, 12).state_dict().items()}
    return config, state


def _plan(strategy, **extra):
    settings = {"lr": 0.05, "epochs": 3, "batch_size": 4, "noise_multiplier": None, "optimizer": "sgd"}
    settings.update(extra)
    return LocalTraining(**settings, local_step=strategy.local_step())


def _norm(delta):
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in delta.values())))


def test_the_registry_names_it_and_checks_its_options():
    config, _ = _setup("federation.strategy=fedprox", "federation.strategy_options.mu=0.5")
    strategy = make_strategy(config.federation)
    assert strategy.name == "fedprox" and strategy.mu == 0.5 and strategy.needs_local_steps
    assert set(STRATEGIES) >= {"fedavg", "fedper", "fedprox"}
    assert make_strategy(_setup("federation.strategy=fedprox")[0].federation).mu == 0.01  # the default
    with pytest.raises(ConfigError, match=r"federation.strategy_options.mu: .*greater than or equal to 0"):
        make_strategy(_setup("federation.strategy=fedprox", "federation.strategy_options.mu=-1")[0].federation)
    with pytest.raises(ConfigError, match=r"federation.strategy_options.nu: .*FedProx takes: mu"):
        make_strategy(_setup("federation.strategy=fedprox", "federation.strategy_options.nu=1")[0].federation)
    with pytest.raises(ConfigError, match=r"federation.strategy_options.mu: .*FedAvg takes: none"):
        make_strategy(_setup("federation.strategy_options.mu=1")[0].federation)
    with pytest.raises(ConfigError, match="allowed: fedavg, fedper, fedprox"):
        make_strategy(_setup("federation.strategy=fedsgd")[0].federation)


def test_mu_zero_is_fedavg_exactly():
    config, state = _setup()
    prox = make_strategy(_setup("federation.strategy=fedprox", "federation.strategy_options.mu=0")[0].federation)
    avg = make_strategy(config.federation)
    a = _client().fit(config, state, list(state), _plan(avg), seed=5)
    b = _client().fit(config, state, list(state), _plan(prox), seed=5)
    for name in a.delta:
        assert torch.equal(a.delta[name], b.delta[name])


def test_the_proximal_term_keeps_the_local_update_near_the_global_model():
    # The paper's local objective h_k = F_k + mu/2 ||w - w^t||^2: the larger mu, the closer the local solution stays
    # to w^t; the update shrinks monotonically and vanishes as mu grows.
    config, state = _setup()
    norms = []
    for mu in (0.0, 0.5, 2.0, 10.0, 1e4):
        overrides = ["federation.strategy=fedprox", f"federation.strategy_options.mu={mu}"]
        strategy = make_strategy(_setup(*overrides)[0].federation)
        norms.append(_norm(_client().fit(config, state, list(state), _plan(strategy), seed=5).delta))
    assert all(a > b for a, b in zip(norms, norms[1:])), norms
    assert norms[-1] < 0.01 * norms[0]


def test_full_batch_sgd_reaches_a_stationary_point_of_the_proximal_objective():
    # Proximal gradient descent on h_k with a small step converges to a point where grad F_k(w) + mu (w - w^t) = 0:
    # the local solution the paper defines (its gamma-inexact solutions tend to it as local work grows).
    config, state = _setup()
    mu = 1.0
    strategy = make_strategy(_setup("federation.strategy=fedprox", f"federation.strategy_options.mu={mu}")[0].federation)
    client = _client(n=8)
    update = client.fit(config, state, list(state), _plan(strategy, lr=0.05, epochs=600, batch_size=8), seed=1)
    model = VFER.from_config(config.model, 12)
    model.load_state_dict({k: state[k] + update.delta[k] for k in state})

    def gradient(parameters):
        model.zero_grad()
        LabelLoss()(model(client.features), client.targets).backward()
        return {name: p.grad.detach().clone() for name, p in parameters}

    trained = gradient(model.named_parameters())
    residual = {name: trained[name] + mu * update.delta[name] for name in trained}
    model.load_state_dict(state)
    start = gradient(model.named_parameters())
    assert _norm(residual) < 0.02 * _norm(start)
    assert _norm(update.delta) > 0.1 * _norm(start) / mu  # it moved: the data pulled against the proximal term


def test_the_stacked_trainer_applies_it_as_fit_does():
    config, _ = _setup("federation.strategy=fedprox", "federation.strategy_options.mu=3")
    strategy = make_strategy(config.federation)
    clients = [_client(n, seed=i, client_id=i + 1) for i, n in enumerate((5, 9, 7))]
    states = []
    for j in range(3):
        torch.manual_seed(100 + j)
        states.append({k: v.clone() for k, v in VFER.from_config(config.model, 12).state_dict().items()})
    plan = _plan(strategy, optimizer="adam", lr=5e-3)
    seeds = [11, 12, 13]
    one_by_one = [c.fit(config, s, list(s), plan, seed=d) for c, s, d in zip(clients, states, seeds)]
    together = fit_clients(clients, config, states, list(states[0]), plan, seeds)
    plain = fit_clients(clients, config, states, list(states[0]), dataclasses.replace(plan, local_step=None), seeds)
    for a, b, c in zip(one_by_one, together, plain):
        for name in a.delta:
            torch.testing.assert_close(b.delta[name], a.delta[name], rtol=1e-3, atol=1e-5)
        assert _norm(b.delta) < _norm(c.delta)  # and the term is really applied there


FAST = ["federation.rounds=3", "federation.adaptation=false", "federation.strategy=fedprox",
        "federation.strategy_options.mu=0.1"]


def test_record_level_distributed_dp_refuses_it_before_any_data_is_read(tmp_path):
    config = small_config(*FAST, "privacy.epsilon=3")
    assert config.mechanism == "distributed" and config.privacy.unit == "record"
    with pytest.raises(ConfigError, match="federation.strategy 'fedprox' changes how clients train locally"):
        prepare_federation(config, clips=None)  # raised before the (absent) data would be loaded


@pytest.mark.parametrize("overrides", [["privacy.epsilon=3", "privacy.unit=person"], ["privacy.epsilon=3",
                                       "privacy.mechanism=local", "aggregation.backend=ckks"],
                                       ["privacy.mechanism=local"]])
@pytest.mark.slow
def test_it_runs_where_clients_train_locally_and_the_budget_is_unchanged(tmp_path, small_clips, overrides):
    prox = simulate(small_config(*FAST, *overrides), tmp_path / "prox", clips=small_clips)
    avg = simulate(small_config(*FAST[:2], *overrides), tmp_path / "avg", clips=small_clips)
    assert prox.strategy == "fedprox"
    if "privacy.epsilon=3" in overrides:  # the proximal step is post-processing of what the mechanism released: the same epsilon
        assert prox.privacy.epsilon_max == pytest.approx(avg.privacy.epsilon_max)
        assert audit_path(tmp_path / "prox").passed
    trained = [torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("prox", "avg")]
    assert any(not torch.equal(a, b) for a, b in zip(_tensors(trained[0]), _tensors(trained[1])))


def _tensors(saved):
    """Every tensor of a saved model file, in order."""
    if isinstance(saved, torch.Tensor):
        return [saved]
    if isinstance(saved, dict):
        return [t for key in sorted(saved, key=str) for t in _tensors(saved[key])]
    return []
