"""One training objective for every trainer, and a strategy that decides what its clients train on.

A strategy gives each client's clips targets and weights every round (from the model the client received and the
per-client state it keeps, checkpointed) and adds per-clip loss terms; the local trainer, Opacus, the stacked
trainer and the distributed clipped sums all minimise the same objective.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import small_config

from privfer.config import load_config
from privfer.errors import ConfigError
from privfer.fl import strategies
from privfer.fl.batched import fit_clients
from privfer.fl.client import FLClient, LocalTraining
from privfer.fl.rounds import TRAINING
from privfer.fl.simulation import prepare_federation, simulate
from privfer.fl.strategies.base import ClientData, check_portable, checked_client_data
from privfer.fl.strategies.fedavg import FedAvg
from privfer.models.clipped_sums import clipped_gradient_sums
from privfer.models.loss import LabelLoss, TrainingObjective, label_term
from privfer.models.vfer import VFER


def confidence_penalty(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Minus the entropy of the prediction, per clip (Pereyra et al. 2017)."""
    log_p = torch.log_softmax(logits, dim=-1)
    return (log_p.exp() * log_p).sum(dim=-1)


OBJECTIVE = TrainingObjective(terms=[("confidence", 0.3, confidence_penalty)])


def _data(n=9, frames=4, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(n, frames, dim)).astype(np.float32))
    y = torch.softmax(torch.from_numpy(rng.normal(size=(n, 6)).astype(np.float32)), -1)
    w = torch.from_numpy(rng.uniform(0.1, 1.0, size=n).astype(np.float32))
    return x, y, w


def _config(*overrides):
    return load_config(None, ["data.frames=4", "data.feature_dim=12", "model.hidden_size=5", "privacy.mechanism=local",
                              *overrides])


def _state(config, private=False):
    torch.manual_seed(3)
    model = VFER.from_config(config.model, 12, private=private)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _expected_step(config, state, x, y, w, lr, private=False):
    """-lr x the gradient of the mean weighted objective, by autograd."""
    model = VFER.from_config(config.model, 12, private=private)
    model.load_state_dict(state)
    model.train()
    OBJECTIVE(model(x), y, w).backward()
    return {name: -lr * p.grad for name, p in model.named_parameters()}


def test_the_objective_weights_each_clip_and_adds_its_terms_per_clip():
    logits, targets = torch.randn(5, 6), torch.softmax(torch.randn(5, 6), -1)
    weights = torch.tensor([1.0, 0.0, 0.5, 0.25, 1.0])
    expected = weights * (label_term(logits, targets) + 0.3 * confidence_penalty(logits, targets))
    torch.testing.assert_close(OBJECTIVE.per_clip(logits, targets, weights), expected)
    # the mean is over clips, not over the weights' sum: one clip's loss depends on that clip alone
    torch.testing.assert_close(OBJECTIVE(logits, targets, weights), expected.sum() / 5)
    torch.testing.assert_close(OBJECTIVE.with_reduction("sum")(logits, targets, weights), expected.sum())
    # without terms or weights it is the label loss every trainer used before
    torch.testing.assert_close(TrainingObjective()(logits, targets), LabelLoss()(logits, targets))
    with pytest.raises(ValueError, match="one loss per clip"):
        TrainingObjective(terms=[("bad", 1.0, lambda lg, t: lg.sum())]).per_clip(logits, targets)
    with pytest.raises(ValueError, match="reduction"):
        TrainingObjective("batchmean")


def test_local_training_minimises_the_weighted_objective():
    config = _config()
    x, y, w = _data()
    state = _state(config)
    plan = LocalTraining(lr=0.1, epochs=1, batch_size=len(x), noise_multiplier=None, optimizer="sgd",
                         objective=OBJECTIVE)
    update = FLClient(1, x, y, w).fit(config, state, list(state), plan, seed=1)
    for name, step in _expected_step(config, state, x, y, w, 0.1).items():
        torch.testing.assert_close(update.delta[name], step, rtol=1e-4, atol=1e-7)
    # weights of zero: nothing to learn from
    zero = FLClient(1, x, y, torch.zeros(len(x))).fit(config, state, list(state), plan, seed=1)
    assert all(float(d.abs().max()) == 0.0 for d in zero.delta.values())


def test_opacus_training_minimises_the_same_objective():
    """Opacus's ghost clipping asks the objective for per-example losses: with every record in the batch (rate 1),
    no noise and a clipping bound no gradient reaches, its step is the weighted objective's gradient."""
    config = _config()
    x, y, w = _data()
    state = _state(config, private=True)
    plan = LocalTraining(lr=0.1, epochs=1, batch_size=len(x), noise_multiplier=0.0, max_grad_norm=1e6,
                         optimizer="sgd", accountant="rdp", noise_source="run_seed", objective=OBJECTIVE)
    update = FLClient(1, x, y, w).fit(config, state, list(state), plan, seed=1)
    for name, step in _expected_step(config, state, x, y, w, 0.1, private=True).items():
        torch.testing.assert_close(update.delta[name], step, rtol=1e-4, atol=1e-7)


def test_the_stacked_trainer_matches_local_training_with_weights_and_terms():
    config = _config()
    clients = []
    for i, n in enumerate((7, 12, 3), start=1):
        x, y, w = _data(n, seed=i)
        clients.append(FLClient(i, x, y, w if i != 2 else None))  # one client unweighted
    states = [_state(config) for _ in clients]
    plan = LocalTraining(lr=5e-3, epochs=2, batch_size=4, noise_multiplier=None, objective=OBJECTIVE)
    seeds = [11, 12, 13]
    alone = [c.fit(config, s, list(s), plan, seed=d) for c, s, d in zip(clients, states, seeds)]
    together = fit_clients(clients, config, states, list(states[0]), plan, seeds)
    for a, b in zip(alone, together):
        assert a.loss == pytest.approx(b.loss, rel=1e-4)
        for name in a.delta:
            torch.testing.assert_close(b.delta[name], a.delta[name], rtol=1e-3, atol=2e-5)


def test_distributed_clipped_sums_clip_the_weighted_objective_per_example():
    torch.manual_seed(0)
    model = VFER(12, 8, fast_dp=True)
    x, y, w = _data(10)
    groups = torch.tensor([0, 1] * 5)
    sums = clipped_gradient_sums(model, x, y, groups, 2, 0.2, weights=w, objective=OBJECTIVE, chunk=3).sums
    expected = {name: torch.zeros_like(value) for name, value in sums.items()}
    params = dict(model.named_parameters())
    for i in range(10):
        grads = torch.autograd.grad(OBJECTIVE.with_reduction("sum")(model(x[i:i + 1]), y[i:i + 1], w[i:i + 1]),
                                    list(params.values()))
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, 0.2 / (float(norm) + 1e-6))
        for name, g in zip(params, grads):
            expected[name][int(groups[i])] += factor * g.double()
    for name in sums:
        torch.testing.assert_close(sums[name], expected[name], rtol=1e-4, atol=1e-7)
    unweighted = clipped_gradient_sums(model, x, y, groups, 2, 0.2, objective=OBJECTIVE).sums
    assert any(not torch.allclose(sums[n], unweighted[n]) for n in sums)  # the weights were used


class Reliability(FedAvg):
    """A test strategy: each clip counts by how much the received model believes its label, discounted by how
    often the client has trained (its state), plus a confidence penalty."""

    name = "reliability"
    title = "reliability test"
    calls: list = []

    def objective_terms(self):
        return [("confidence", 0.3, confidence_penalty)]

    def client_data(self, phase, client_id, features, targets, model, state, *, round_index=0):
        seen = 0 if state is None else int(state["rounds"])
        with torch.no_grad():
            probabilities = torch.softmax(model().eval()(features), -1)
        belief = (probabilities * targets).sum(-1) if targets.dtype.is_floating_point else \
            probabilities.gather(1, targets[:, None])[:, 0]
        Reliability.calls.append((phase, client_id, seen))
        return ClientData(targets, (belief / (1 + seen)).clamp(0, 1)), {"rounds": seen + 1, "mean": belief.mean()}


class Coupled(FedAvg):
    name = "coupled"
    title = "coupled test"
    couples_records = True


def _with_strategy(config, name):
    return config.model_copy(update={"federation": config.federation.model_copy(update={"strategy": name})})


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(strategies.STRATEGIES, "reliability", Reliability)
    monkeypatch.setitem(strategies.STRATEGIES, "coupled", Coupled)
    Reliability.calls = []


BASE = ["federation.rounds=3", "federation.clients_per_round=4", "federation.adaptation=false",
        "output.save_model=true", "privacy.noise_source=run_seed"]
MECHANISMS = {
    "local": ["privacy.epsilon=6", "privacy.mechanism=local", "privacy.accountant=rdp", "aggregation.backend=plain"],
    "record": ["privacy.epsilon=6"],
    "person": ["privacy.epsilon=6", "privacy.unit=person", "model.hidden_size=8"],
    "none": ["aggregation.backend=plain"],
}


@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_every_mechanism_trains_on_what_the_strategy_gives_each_client(registered, small_clips, mechanism,
                                                                       tmp_path):
    records = []
    config = small_config(*BASE, *MECHANISMS[mechanism])
    simulate(_with_strategy(config, "reliability"), tmp_path / "run", clips=small_clips, on_round=records.append)
    # every selected client, every round, with the state it kept last time
    expected, seen = [], {}
    for record in records:
        for client in record.clients:
            expected.append((TRAINING, client, seen.get(client, 0)))
            seen[client] = seen.get(client, 0) + 1
    assert sorted(Reliability.calls) == sorted(expected)
    # the weights changed the model: the same run under FedAvg ends elsewhere
    fedavg = simulate(config, tmp_path / "fedavg", clips=small_clips)
    ours = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["global"]
    theirs = torch.load(tmp_path / "fedavg" / "model.pt", weights_only=True)["global"]
    assert any(not torch.equal(ours[n], theirs[n]) for n in ours)
    assert fedavg.privacy.epsilon_max == json.loads((tmp_path / "run" / "result.json").read_text())[
        "privacy"]["epsilon_max"]  # what a client trains on is its own business: the budget is the same


class Killed(Exception):
    pass


def test_the_strategys_client_state_survives_a_kill(registered, small_clips, tmp_path):
    config = small_config(*BASE, *MECHANISMS["local"], "federation.rounds=4", "federation.clients_per_round=12")
    config = _with_strategy(config, "reliability")
    simulate(config, tmp_path / "whole", clips=small_clips)
    whole_calls = list(Reliability.calls)

    def kill_after_two(record):
        if record.round == 2:
            raise Killed

    with pytest.raises(Killed):
        simulate(config, tmp_path / "killed", clips=small_clips, on_round=kill_after_two)
    Reliability.calls = []
    simulate(config, tmp_path / "killed", clips=small_clips)
    # the resumed rounds see the state kept before the kill, as the uninterrupted run did
    assert Reliability.calls == whole_calls[-len(Reliability.calls):]
    assert len(Reliability.calls) == 24 and any(seen >= 1 for _, _, seen in Reliability.calls)
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["global"]
    resumed = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)["global"]
    for name in whole:
        assert torch.equal(whole[name], resumed[name])


def test_a_client_data_without_the_round_index_is_refused_before_the_run(monkeypatch, small_clips):
    class Old(FedAvg):
        name, title = "old", "old signature"

        def client_data(self, phase, client_id, features, targets, model, state):
            return None, state

    monkeypatch.setitem(strategies.STRATEGIES, "old", Old)
    config = _with_strategy(small_config(*BASE, *MECHANISMS["none"]), "old")
    with pytest.raises(ConfigError, match="round_index"):
        prepare_federation(config, small_clips)


def test_a_strategy_that_couples_records_is_refused_under_record_level_dp(registered, small_clips):
    for mechanism in ("local", "record"):
        config = small_config(*BASE, *MECHANISMS[mechanism])
        config = _with_strategy(config, "coupled")
        with pytest.raises(ConfigError, match="federation.strategy 'coupled'.*record-level DP"):
            prepare_federation(config, small_clips)
    for mechanism in ("person", "none"):
        config = small_config(*BASE, *MECHANISMS[mechanism])
        config = _with_strategy(config, "coupled")
        prepare_federation(config, small_clips)


@pytest.mark.parametrize("data, message", [
    (ClientData(torch.zeros(4, 6)), "probability distribution"),
    (ClientData(torch.full((3, 6), 1 / 6)), "shape"),
    (ClientData(torch.full((4, 6), 1 / 6), torch.tensor([0.5, 1.0, 1.5, 0.0])), r"in \[0, 1\]"),
    (ClientData(torch.full((4, 6), 1 / 6), torch.tensor([0.5, float("nan"), 1.0, 0.0])), r"in \[0, 1\]"),
    (ClientData(torch.full((4, 6), 1 / 6), torch.ones(3)), "one entry per clip"),
    ({"targets": 1}, "ClientData"),
])
def test_what_a_strategy_gives_a_client_is_checked_before_training(data, message):
    targets = torch.full((4, 6), 1 / 6)
    with pytest.raises(ValueError, match=message):
        checked_client_data(Reliability(), 3, 4, targets, data)
    classes = torch.tensor([0, 5, 2, 1])
    with pytest.raises(ValueError, match="class index"):
        checked_client_data(Reliability(), 3, 4, classes, ClientData(torch.tensor([0, 6, 2, 1])))
    assert checked_client_data(Reliability(), 3, 4, classes, None) is None


def test_a_client_state_the_checkpoint_cannot_keep_is_refused():
    check_portable({"rounds": 2, "scores": torch.ones(3), 4: [1.5, "x", None]}, "here")
    for bad in (np.ones(3), {"f": lambda: 0}, {(1, 2): 0}, {"a": [[[[[[[[[[1]]]]]]]]]]}):
        with pytest.raises(ValueError, match="here: the strategy's client state"):
            check_portable(bad, "here")


def test_the_base_strategy_changes_nothing():
    strategy = FedAvg()
    assert strategy.client_data(TRAINING, 1, torch.zeros(2, 3, 4), torch.zeros(2, 6), lambda: None, None) == \
        (None, None)


def test_what_a_checkpoint_cannot_load_back_is_refused_before_it_is_kept(tmp_path):
    """Exact types: numpy scalars, enums, named tuples and dict subclasses pass isinstance but not weights_only."""
    import collections
    import enum

    class Level(enum.IntEnum):
        LOW = 1

    Pair = collections.namedtuple("Pair", "a b")
    for bad in (np.float64(0.5), np.str_("x"), Level.LOW, Pair(1, 2), collections.defaultdict(int),
                {"x": collections.OrderedDict()}, torch.nn.Parameter(torch.ones(2))):
        with pytest.raises(ValueError, match="client state"):
            check_portable(bad, "client 1")
    good = {"rounds": 2, "scores": torch.ones(3), 4: [1.5, "x", None, (1, 2.0)], "flag": True}
    check_portable(good, "client 1")
    torch.save(good, tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt", weights_only=True)["rounds"] == 2


def batch_centred(logits, targets):
    """A term that is NOT per clip: it subtracts the batch mean."""
    p = torch.softmax(logits, -1)
    return ((p - p.mean(0)) ** 2).sum(-1)


class BatchTerm(FedAvg):
    name = "batchterm"
    title = "batch term test"

    def objective_terms(self):
        return [("centred", 1.0, batch_centred)]


class Mutating(FedAvg):
    """Edits what it is given in place and returns nothing: the client's own labels must not change."""

    name = "mutating"
    title = "mutating test"

    def client_data(self, phase, client_id, features, targets, model, state, *, round_index=0):
        targets.mul_(3.0)
        features.zero_()
        return None, state


def test_a_term_that_is_not_per_clip_and_edits_in_place_change_nothing(monkeypatch, small_clips):
    monkeypatch.setitem(strategies.STRATEGIES, "batchterm", BatchTerm)
    monkeypatch.setitem(strategies.STRATEGIES, "mutating", Mutating)
    with pytest.raises(ConfigError, match=r"federation.strategy: .*terms \(centred\) are not per clip"):
        prepare_federation(_with_strategy(small_config(*BASE, *MECHANISMS["person"]), "batchterm"), small_clips)
    federation = prepare_federation(_with_strategy(small_config(*BASE, *MECHANISMS["record"]), "mutating"),
                                    small_clips)
    client = next(iter(federation.clients[TRAINING].values()))
    before = (client.features.clone(), client.targets.clone())
    from privfer.fl.federation import RunState

    state = RunState(global_state={}, personal={}, accounts={})
    assert federation.client(state, TRAINING, client.client_id, []) is client
    assert torch.equal(client.features, before[0]) and torch.equal(client.targets, before[1])


def test_a_subclassed_objective_keeps_its_loss_under_every_reduction():
    class Doubled(TrainingObjective):
        def per_clip(self, logits, targets, weights=None):
            return 2 * super().per_clip(logits, targets, weights)

    logits, targets = torch.randn(4, 6), torch.softmax(torch.randn(4, 6), -1)
    objective = Doubled()
    torch.testing.assert_close(objective.with_reduction("sum")(logits, targets), 2 * label_term(logits, targets).sum())
    assert objective.reduction == "mean"  # the copy's reduction, not the original's
