"""The stacked trainer takes each client's own steps: it matches FLClient.fit client by client."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privfer.config import load_config
from privfer.fl import batched
from privfer.fl.batched import batchable, fit_clients, fit_many
from privfer.fl.client import FLClient, LocalTraining
from privfer.models.vfer import VFER


def _clients(sizes, frames=6, dim=12, discrete=False, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(sizes, start=1):
        x = rng.normal(size=(n, frames, dim)).astype(np.float32)
        if discrete:
            y = rng.integers(0, 6, size=n)
        else:
            votes = rng.integers(0, 4, size=(n, 6)).astype(np.float32)
            votes[:, 0] += 1
            y = votes / votes.sum(axis=1, keepdims=True)
        out.append(FLClient(i, x, y))
    return out


def _config(*overrides):
    # local training: runs without DP on the local line (the distributed line's train by one step per round)
    return load_config(None, ["data.frames=6", "data.feature_dim=12", "model.hidden_size=5", "privacy.mechanism=local",
                              *overrides])


def _states(config, count, dim=12):
    states = []
    for j in range(count):
        torch.manual_seed(100 + j)
        model = VFER.from_config(config.model, dim)
        if model.shortcut is not None:
            torch.nn.init.normal_(model.shortcut.weight, std=0.1)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def _compare(config, plan, clients, shared=None):
    states = _states(config, len(clients))
    shared = shared if shared is not None else list(states[0])
    seeds = [7 * c.client_id + 1 for c in clients]
    one_by_one = [c.fit(config, s, shared, plan, seed=d) for c, s, d in zip(clients, states, seeds)]
    together = fit_clients(clients, config, states, shared, plan, seeds)
    for a, b in zip(one_by_one, together):
        assert a.client == b.client and a.steps == b.steps and a.examples == b.examples
        assert set(a.delta) == set(b.delta) and set(a.personal) == set(b.personal)
        assert a.loss == pytest.approx(b.loss, rel=1e-4)
        for name in a.delta:
            assert a.delta[name].abs().max() > 0  # the client really trained
            # Adam divides by sqrt(v): coordinates with near-zero gradients amplify rounding, so a loose atol
            torch.testing.assert_close(b.delta[name], a.delta[name], rtol=1e-3, atol=2e-5 * plan.lr / 5e-3)
        for name in a.personal:
            torch.testing.assert_close(b.personal[name], a.personal[name], rtol=1e-3, atol=2e-5 * plan.lr / 5e-3)
    return together


@pytest.mark.parametrize("overrides", [
    ["model.readout=mean", "model.shortcut=true"],
    ["model.readout=last", "model.shortcut=false", "model.num_layers=2"],
])
def test_matches_fit_with_adam_and_uneven_clients(overrides):
    config = _config(*overrides)
    plan = LocalTraining(lr=5e-3, epochs=2, batch_size=8, noise_multiplier=None)
    _compare(config, plan, _clients([5, 8, 19, 30]))  # 1, 1, 3 and 4 batches per epoch: clients idle at the end


def test_matches_fit_with_sgd_weight_decay_and_discrete_labels():
    config = _config("model.readout=mean", "model.shortcut=true")
    plan = LocalTraining(lr=0.05, epochs=1, batch_size=4, noise_multiplier=None, weight_decay=0.01, optimizer="sgd")
    _compare(config, plan, _clients([3, 9, 14], discrete=True))


def test_a_batch_larger_than_every_client_is_one_step_each():
    config = _config("model.readout=mean", "model.shortcut=true")
    plan = LocalTraining(lr=5e-3, epochs=2, batch_size=4096, noise_multiplier=None, weight_decay=0.001)
    updates = _compare(config, plan, _clients([2, 7, 11]))
    assert [u.steps for u in updates] == [2, 2, 2]


def test_personal_layers_stay_out_of_the_delta():
    config = _config("model.readout=mean", "model.shortcut=true")
    plan = LocalTraining(lr=5e-3, epochs=1, batch_size=8, noise_multiplier=None)
    clients = _clients([10, 12])
    shared = [n for n in _states(config, 1)[0] if not n.startswith("head.")]
    together = _compare(config, plan, clients, shared)
    assert set(together[0].personal) == {"head.weight", "head.bias"}


def test_chunks_give_the_same_result(monkeypatch):
    config = _config("model.readout=mean", "model.shortcut=true")
    plan = LocalTraining(lr=5e-3, epochs=1, batch_size=8, noise_multiplier=None)
    clients = _clients([9, 11, 13, 7, 10])
    states = _states(config, len(clients))
    shared = list(states[0])
    seeds = [1, 2, 3, 4, 5]
    whole = fit_clients(clients, config, states, shared, plan, seeds)
    # per client of 13 clips: its features (13 x 6 x 12) and one batch of 8 clips' activations (8 x 6 x (12 + 16 x 5))
    monkeypatch.setattr(batched, "MAX_CHUNK_VALUES", 2 * (13 * 6 * 12 + 8 * 6 * (12 + 16 * 5)))
    sizes = []
    real = batched._fit_chunk
    monkeypatch.setattr(batched, "_fit_chunk", lambda chunk, *rest: sizes.append(len(chunk)) or real(chunk, *rest))
    chunked = fit_clients(clients, config, states, shared, plan, seeds)
    assert sizes == [2, 2, 1]  # two clients per chunk at most, every client once
    for a, b in zip(whole, chunked):
        for name in a.delta:
            torch.testing.assert_close(a.delta[name], b.delta[name], rtol=1e-4, atol=1e-6)


def test_what_cannot_be_stacked_is_refused_and_trained_one_by_one():
    plan = LocalTraining(lr=5e-3, epochs=1, batch_size=8, noise_multiplier=None)
    assert batchable(_config(), plan) is None
    assert "dropout" in batchable(_config("model.dropout=0.2"), plan)
    assert "fast DP" in batchable(_config("model.recurrent=fast_dp"), plan)
    private = LocalTraining(lr=5e-3, epochs=1, batch_size=8, noise_multiplier=1.0)
    assert "Opacus" in batchable(_config(), private)
    config = _config("model.dropout=0.2")
    clients = _clients([6, 7])
    with pytest.raises(ValueError, match="dropout"):
        fit_clients(clients, config, _states(config, 2), list(_states(config, 1)[0]), plan, [1, 2])
    # fit_many falls back to fit for such a model (same seeds: the same result as fit, bit for bit)
    states = _states(config, 2)
    shared = list(states[0])
    many = fit_many(clients, config, states, shared, plan, [1, 2])
    single = [c.fit(config, s, shared, plan, seed=d) for c, s, d in zip(clients, states, [1, 2])]
    for a, b in zip(many, single):
        for name in a.delta:
            assert torch.equal(a.delta[name], b.delta[name])
