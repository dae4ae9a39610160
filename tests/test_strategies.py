"""The strategy seam: a registry by name, options the strategy checks, a local step every trainer applies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import small_config
from privfer.config import load_config
from privfer.errors import ConfigError
from privfer.fl import strategies
from privfer.fl.batched import fit_clients
from privfer.fl.client import FLClient, LocalTraining
from privfer.fl.simulation import prepare_federation
from privfer.fl.strategies import FedAvg, make_strategy
from privfer.models.vfer import VFER


class Anchored(FedAvg):
    """A test strategy whose local step undoes every optimizer step: clients must return zero updates."""

    name = "anchored"
    title = "Anchored"
    needs_local_steps = True

    def local_step(self):
        return lambda parameter, received, lr: received.clone()


def _config(*overrides):
    return load_config(None, ["data.frames=6", "data.feature_dim=12", "model.hidden_size=5", "privacy.mechanism=local",
                              *overrides])


def _clients(sizes):
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate(sizes, start=1):
        votes = rng.integers(1, 4, size=(n, 6)).astype(np.float32)
        out.append(FLClient(i, rng.normal(size=(n, 6, 12)).astype(np.float32), votes / votes.sum(1, keepdims=True)))
    return out


def test_unknown_names_and_options_are_config_errors_naming_the_field():
    assert strategies.names()[:2] == ["fedavg", "fedper"]
    with pytest.raises(ConfigError, match="federation.strategy = 'fedsgd': allowed: fedavg, fedper"):
        make_strategy(_config("federation.strategy=fedsgd").federation)
    with pytest.raises(ConfigError, match=r"federation.strategy_options.lr: .*FedAvg takes: none"):
        make_strategy(_config("federation.strategy_options.lr=1").federation)
    assert make_strategy(_config("federation.strategy=fedper", "federation.personal_layers=2").federation) \
        .personal_layers == 2
    with pytest.raises(ConfigError, match="federation.strategy"):
        _config("federation.strategy=Fed Avg!")  # not even a name


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_every_trainer_applies_the_local_step_after_each_optimizer_step(optimizer):
    config = _config()
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in VFER.from_config(config.model, 12).state_dict().items()}
    plan = LocalTraining(lr=0.05, epochs=2, batch_size=3, noise_multiplier=None, optimizer=optimizer,
                         local_step=Anchored().local_step())
    clients = _clients([4, 7])
    for update in [c.fit(config, state, list(state), plan, seed=1) for c in clients] + \
            fit_clients(clients, config, [state, state], list(state), plan, [1, 2]):
        assert update.steps > 0 and all(torch.equal(d, torch.zeros_like(d)) for d in update.delta.values())
    dp = LocalTraining(lr=0.05, epochs=1, batch_size=3, noise_multiplier=1.0, local_step=Anchored().local_step())
    private = {k: v.clone() for k, v in VFER.from_config(config.model, 12, private=True).state_dict().items()}
    update = clients[1].fit(config, private, list(private), dp, seed=1)  # under Opacus too
    assert all(torch.equal(d, torch.zeros_like(d)) for d in update.delta.values())


def test_a_strategy_that_needs_local_steps_is_refused_where_there_are_none(monkeypatch):
    monkeypatch.setitem(strategies.STRATEGIES, "anchored", Anchored)
    with pytest.raises(ConfigError, match="federation.strategy 'anchored' changes how clients train locally, and "
                                          "distributed DP-SGD"):
        prepare_federation(small_config("federation.strategy=anchored", "privacy.epsilon=3"), clips=None)


class Frozen(FedAvg):
    """A test strategy whose server never moves the model: it records each release and keeps the global state."""

    name = "frozen"
    title = "Frozen"
    seen: list[tuple[str, int]] = []

    def server_step(self, gradient, global_state, template, shared, phase, server_state):
        Frozen.seen.append((phase, gradient.size))
        return global_state, server_state


@pytest.mark.parametrize("unit", ["record", "person"])
def test_the_strategy_applies_every_release_under_distributed_dp(small_clips, monkeypatch, unit):
    """The server optimizer belongs to the strategy: both distributed trainers hand it the decoded release of
    every round, and what it returns is the new global model."""
    from privfer.fl.simulation import simulate

    monkeypatch.setitem(strategies.STRATEGIES, "frozen", Frozen)
    Frozen.seen = []
    settings = ("privacy.epsilon=3", f"privacy.unit={unit}", "federation.rounds=3", "federation.local_epochs=1",
                "federation.adaptation=false", "privacy.noise_source=run_seed")
    config = small_config(*settings)
    frozen = simulate(small_config("federation.strategy=frozen", *settings), None, clips=small_clips)
    shared = sum(p.numel() for p in VFER.from_config(config.model, small_clips.features.shape[-1], private=True)
                 .parameters() if p.requires_grad)
    assert Frozen.seen == [("training", shared)] * 3
    trained = simulate(config, None, clips=small_clips)
    assert frozen.test != trained.test  # the model that was scored is the one the strategy's server step returned
    fed = config.federation
    assert make_strategy(fed).server_optimizer("training") == (fed.server_optimizer, fed.server_lr, fed.server_momentum)
