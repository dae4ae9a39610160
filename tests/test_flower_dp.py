"""Person-level distributed DP in Flower: each node adds its own noise share, checks the server's plan, and keeps
a lifetime ledger on its own disk across runs and restarts."""

from __future__ import annotations

import functools

import json
from dataclasses import asdict, replace

import numpy as np
import pytest

pytest.importorskip("flwr", reason='the Flower integration needs pip install -e ".[flower]"')

from flwr.client import ClientApp  # noqa: E402
from flwr.common import Array, ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAdam, FedAvg  # noqa: E402

from privfer.integrations.flower import (  # noqa: E402
    DistributedDP,
    LocalGrid,
    NodeLedger,
    NodePrivacy,
    SecAggGrid,
    UnacceptablePlan,
    make_secagg_mod,
)

from privfer.errors import PrivferError  # noqa: E402
from privfer.privacy.distributed import NOISELESS  # noqa: E402
from privfer.privacy.node import BudgetExhausted, NodeLedgerError, accept_plan, plan_to_json  # noqa: E402
from privfer.privacy.noise import NoiseSteps, noise_family  # noqa: E402

SKELLAM = noise_family("skellam")
from privfer.secagg import SecAggConfig  # noqa: E402

SemiHonestGrid = functools.partial(SecAggGrid, security="semi_honest")  # active security: test_flower_active.py

SHAPES = {"w": (6, 5), "b": (5,)}
DIMENSION = 35
DELTA = 1e-3


def step(node: int, server_round: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([node, server_round])
    return {k: rng.normal(0, 0.1, s) for k, s in SHAPES.items()}


def make_app(policy_for, trained: list | None = None):
    app = ClientApp(mods=[make_secagg_mod(privacy=policy_for)])

    @app.train()
    def train(msg: Message, ctx) -> Message:
        if trained is not None:
            trained.append(ctx.node_id)
        server_round = int(msg.content["config"]["server-round"])
        delta = step(ctx.node_id, server_round)
        arrays = {k: (a.numpy() + delta[k]).astype(np.float32) for k, a in msg.content["arrays"].items()}
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                   "metrics": MetricRecord({"num-examples": 10, "loss": 0.5})}), reply_to=msg)

    return app


def policies(tmp_path, lifetime: float):
    return lambda ctx: NodePrivacy(ledger=tmp_path / f"node-{ctx.node_id}.json", lifetime_epsilon=lifetime,
                                   delta=DELTA)


def initial() -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})


def run(grid, rounds=1):
    result = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=5).start(
        grid=grid, initial_arrays=initial(), num_rounds=rounds, timeout=5)
    return {k: a.numpy() for k, a in result.arrays.items()}


DP = DistributedDP(epsilon=500.0, rounds=2, delta=DELTA, max_update_norm=1.0)  # little noise; updates within S


def test_nodes_add_their_own_shares_and_the_mean_update_arrives(tmp_path):
    secure = SemiHonestGrid(LocalGrid(make_app(policies(tmp_path, 1000.0)), 5), dp=DP)
    arrays = run(secure, rounds=2)
    nodes = secure.grid.node_ids
    expected = {k: sum(step(n, 1)[k] + step(n, 2)[k] for n in nodes) / 5 for k in SHAPES}  # unweighted, unclipped
    # the noise the plan puts in each round's mean: Skellam of variance mu in units of 1/scale, over 5 nodes; two
    # rounds add. Six standard deviations (the 35 coordinates all pass with probability > 1 - 1e-7).
    noise = DP.plan(5, DIMENSION)
    sigma = np.sqrt(2 * noise.mu) / (noise.scale * 5)
    for k in SHAPES:
        assert np.allclose(arrays[k], expected[k], atol=6 * sigma + 2 / noise.scale), (k, sigma)
        assert not np.allclose(arrays[k], expected[k], atol=1e-6)  # the noise is there
    for report in secure.reports:
        assert report.aborted is None and len(report.included) == 5
        assert report.example_count == 0  # no count leaves a node
    plan = DP.plan(5, DIMENSION)
    for node in nodes:
        ledger = json.loads((tmp_path / f"node-{node}.json").read_text())
        assert ledger["rounds"] == 2 and ledger["unit"] == "person"
        history = [NoiseSteps(*item[:4], int(item[4])) for item in ledger["history"]]
        assert [h.steps for h in history] == [2]
        assert ledger["epsilon"] == pytest.approx(SKELLAM.epsilon(history, DELTA)[0], rel=1e-12)
        assert ledger["epsilon"] == pytest.approx(SKELLAM.epsilon([plan.steps_entry(2)], DELTA)[0], rel=1e-9)


def test_a_restarted_node_keeps_its_spent_budget_and_refuses_past_it(tmp_path):
    plan = DistributedDP(epsilon=3.0, rounds=2, delta=DELTA).plan(5, DIMENSION)
    lifetime = SKELLAM.epsilon([plan.steps_entry(2)], DELTA)[0] * 1.0001  # two rounds, not three
    dp = DistributedDP(epsilon=3.0, rounds=2, delta=DELTA)
    first = SemiHonestGrid(LocalGrid(make_app(policies(tmp_path, lifetime)), 5), dp=dp)
    run(first, rounds=2)
    assert all(r.aborted is None for r in first.reports)
    # "restart": new node processes (fresh Contexts, new mods), the same ledger files on their disks
    trained: list[int] = []
    second = SemiHonestGrid(LocalGrid(make_app(policies(tmp_path, lifetime), trained), 5), dp=dp)
    run(second, rounds=1)
    report = second.reports[-1]
    assert report.included == [] and len(report.dropped) == 5
    assert all("lifetime" in reason for reason in report.dropped.values())
    assert trained == []  # refused before any training
    for node in second.grid.node_ids:
        assert json.loads((tmp_path / f"node-{node}.json").read_text())["rounds"] == 2


def test_a_corrupt_ledger_is_refused_with_a_clear_error(tmp_path):
    policy = NodePrivacy(ledger=tmp_path / "ledger.json", lifetime_epsilon=10.0, delta=DELTA)
    entry = NoiseSteps(1e6, 1e3, 1e3, 1.0, 1)
    ledger = NodeLedger(policy)
    ledger.charge(entry, "r1")
    assert ledger.spent() == pytest.approx(SKELLAM.epsilon([entry], DELTA)[0])
    stored = ledger.load().document()
    for damage, why in (("{not json", "cannot be read"), (json.dumps({"schema": "other"}), "not a privfer.node_ledger"),
                        (json.dumps({**stored, "delta": 0.5}), "one delta"),
                        (json.dumps({**stored, "history": [[1, 2, 3]]}), r"field 'history\[0\]'"),
                        (json.dumps({**stored, "rounds": -1}), "field 'rounds' must be in"),
                        (json.dumps({**stored, "rounds": True}), "field 'rounds' must be a whole number"),
                        (json.dumps({**stored, "epsilon": "1"}), "field 'epsilon' must be a number"),
                        (json.dumps({**stored, "lifetime_epsilon": 0}), "field 'lifetime_epsilon' must be in"),
                        (json.dumps({**stored, "mechanism_id": "local"}), "field 'mechanism_id'"),
                        (json.dumps({**stored, "extra": 1}), "field 'extra' is not a field"),
                        (json.dumps({k: v for k, v in stored.items() if k != "epsilon"}), "lacks the field 'epsilon'"),
                        ('{"schema": "privfer.node_ledger/1", "schema": "privfer.node_ledger/1"}', "appears twice"),
                        ("[" * 100_000, "cannot be read")):
        (tmp_path / "bad.json").write_text(damage)
        with pytest.raises(NodeLedgerError, match="bad.json") as refused:
            NodeLedger(replace(policy, ledger=tmp_path / "bad.json")).check(entry)
        assert len(str(refused.value)) < 600
        assert refused.match(why)
    (tmp_path / "big.json").write_bytes(b" " * (2 << 20))
    with pytest.raises(NodeLedgerError, match="larger than"):
        NodeLedger(replace(policy, ledger=tmp_path / "big.json")).load()
    with pytest.raises(BudgetExhausted, match="lifetime"):
        NodeLedger(replace(policy, lifetime_epsilon=1e-6)).check(entry)
    # in a round: the node with the corrupt ledger drops out with the reason, the others go on
    bad = tmp_path / "node-1000.json"
    bad.write_text("{truncated")
    secure = SemiHonestGrid(LocalGrid(make_app(policies(tmp_path, 1000.0)), 6), dp=DP)
    FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=6).start(
        grid=secure, initial_arrays=initial(), num_rounds=1, timeout=5)
    report = secure.reports[-1]
    assert "cannot be read" in report.dropped[1000] and 1000 not in report.included


def test_plans_past_the_itemized_limit_are_folded_into_one_exact_rdp_vector(tmp_path, monkeypatch):
    from privfer.privacy import node_ledger as node_dp

    monkeypatch.setattr(node_dp, "MAX_LEDGER_ENTRIES", 2)
    policy = NodePrivacy(ledger=tmp_path / "ledger.json", lifetime_epsilon=50.0, delta=DELTA)
    ledger = NodeLedger(policy)
    # a server nudging mu each round: five distinct plans, two itemized, three folded
    steps = [NoiseSteps(1e6 * (1 + i * 1e-9), 1e3, 1e3, 1.0, 1) for i in range(5)] + \
        [NoiseSteps(1e6, 1e3, 1e3, 1.0, 1)]  # the first plan again: merged into its entry
    for i, step in enumerate(steps):
        spent = ledger.charge(step, f"r{i}")
    stored = json.loads((tmp_path / "ledger.json").read_text())
    assert len(stored["history"]) == 2 and stored["history"][0][4] == 2 and stored["folded"]["rounds"] == 3
    assert stored["rounds"] == 6
    exact = SKELLAM.epsilon(steps, DELTA)[0]
    assert spent == pytest.approx(exact, rel=1e-12) and ledger.spent() == pytest.approx(exact, rel=1e-12)
    assert NodeLedger(policy).spent() == pytest.approx(exact, rel=1e-12)  # a restarted node reads the same
    for damage in ({"rdp": stored["folded"]["rdp"][:-1]}, {"rdp": [-1.0] * len(stored["folded"]["rdp"])},
                   {"rounds": 99}, {"orders": [2, 3]}):
        (tmp_path / "bad.json").write_text(json.dumps({**stored, "folded": {**stored["folded"], **damage}}))
        with pytest.raises(NodeLedgerError, match="field 'folded'"):
            NodeLedger(replace(policy, ledger=tmp_path / "bad.json")).spent()


def test_a_node_checks_the_servers_plan():
    policy = NodePrivacy(ledger="/nonexistent/ledger.json", lifetime_epsilon=10.0, delta=DELTA)
    with pytest.raises(ValueError, match="absolute"):
        NodePrivacy(ledger="ledger.json", lifetime_epsilon=10.0, delta=DELTA)
    with pytest.raises(NodeLedgerError, match="directory does not exist"):
        NodeLedger(policy)
    plan = DistributedDP(epsilon=3.0, rounds=4, delta=DELTA).plan(20, DIMENSION)
    config = SecAggConfig(num_clients=20, encoding="integer", integer_sum_bound=plan.sum_bound,
                          min_inputs=plan.min_inputs, modulus_bits=plan.modulus_bits)
    assert accept_plan(plan_to_json(plan), config, DIMENSION, policy) == plan
    bad = {
        "half the noise per share": replace(plan, share_variance=plan.share_variance / 2),
        "no colluders assumed": replace(plan, colluders=0),
        "fewer minimum inputs": replace(plan, min_inputs=plan.min_inputs - 3),
        "understated sensitivity": replace(plan, l2=plan.l2 / 2),
        "another dimension": replace(plan, dimension=DIMENSION + 1),
        "a sum bound too small for honest sums": replace(plan, sum_bound=int(plan.scale)),
    }
    for what, changed in bad.items():
        # the round's config enforces the changed plan: only the node's own checks can refuse it
        enforced = SecAggConfig(num_clients=20, encoding="integer", integer_sum_bound=changed.sum_bound,
                                min_inputs=changed.min_inputs, modulus_bits=changed.modulus_bits)
        with pytest.raises(UnacceptablePlan, match="refuses"):
            accept_plan(plan_to_json(changed), enforced, DIMENSION, policy)
    with pytest.raises(UnacceptablePlan, match="does not enforce"):
        accept_plan(plan_to_json(plan), SecAggConfig(num_clients=20), DIMENSION, policy)
    # a server that sends a run without DP's plan (no noise family, no shares) to nodes with a privacy policy
    noiseless = replace(plan, noise=NOISELESS, mu=0.0, share_variance=0.0)
    with pytest.raises(UnacceptablePlan, match="only with skellam noise shares"):
        accept_plan(plan_to_json(noiseless), config, DIMENSION, policy)
    with pytest.raises(UnacceptablePlan, match="variance"):  # and with the family's name but no variance
        accept_plan(plan_to_json(replace(noiseless, noise=plan.noise)), config, DIMENSION, policy)
    # a node that assumes 5 sybils or colluders whatever the round's size refuses a plan sized by the fraction (2 of
    # 20), and accepts one whose honest shares carry the noise without 5 of the round's nodes
    wary = replace(policy, min_colluders=5)
    with pytest.raises(UnacceptablePlan, match="sized for 2 colluders, this node assumes 5"):
        accept_plan(plan_to_json(plan), config, DIMENSION, wary)
    sized = DistributedDP(epsilon=3.0, rounds=4, delta=DELTA, min_colluders=5).plan(20, DIMENSION)
    assert sized.colluders == 5 and sized.share_variance * (sized.min_inputs - 5) >= sized.mu * (1 - 1e-9)
    assert sized.share_variance > plan.share_variance  # fewer honest shares, each carries more
    enforced = SecAggConfig(num_clients=20, encoding="integer", integer_sum_bound=sized.sum_bound,
                            min_inputs=sized.min_inputs, modulus_bits=sized.modulus_bits)
    assert accept_plan(plan_to_json(sized), enforced, DIMENSION, wary) == sized
    with pytest.raises(ValueError, match="min_colluders"):
        replace(policy, min_colluders=-1)
    for junk in ("", "[]", json.dumps({"mechanism": "local"}), json.dumps({**asdict(plan), "mechanism":
                                                                             "distributed_person", "mu": "x"})):
        with pytest.raises(UnacceptablePlan):
            accept_plan(junk, config, DIMENSION, policy)


def test_dp_and_no_dp_do_not_mix(tmp_path):
    # a node with a privacy policy never answers a round without a plan
    plain_server = SemiHonestGrid(LocalGrid(make_app(policies(tmp_path, 10.0)), 5))
    run(plain_server)
    assert all("person-level DP plan" in r for r in plain_server.reports[-1].dropped.values())
    # a node without one cannot add a noise share: it refuses a DP round
    no_policy = SemiHonestGrid(LocalGrid(make_app(None), 5), dp=DP)
    run(no_policy)
    assert all("no privacy policy" in r for r in no_policy.reports[-1].dropped.values())
    with pytest.raises(ValueError, match="no metric"):
        SemiHonestGrid(LocalGrid(make_app(None), 5), dp=DP, train_metrics=("loss",))


def record_sums(node: int, clip: float, unclipped: bool = False) -> np.ndarray:
    """Node ``node``'s per-example vectors, each clipped to ``clip``, summed (flat, in SHAPES' order)."""
    rng = np.random.default_rng(node)
    records = 4 + node % 3
    examples = {k: rng.normal(0, 1, (records, *shape)) for k, shape in SHAPES.items()}
    flat = np.concatenate([examples[k].reshape(records, -1) for k in SHAPES], axis=1)
    factors = np.ones(records) if unclipped else np.minimum(1.0, clip / np.linalg.norm(flat, axis=1))
    return factors @ flat


def record_app(policy_for, clip: float, unclipped: bool = False):
    """A record-level ClientApp: its 'clipped gradient sum' is the sum of per-example vectors each clipped to the C
    the mod passes on, with its record count as the weight."""
    app = ClientApp(mods=[make_secagg_mod(privacy=policy_for)])

    @app.train()
    def train(msg: Message, ctx) -> Message:
        config = msg.content["config"]
        c, q = float(config["privfer-dp-max-grad-norm"]), float(config["privfer-dp-sample-rate"])
        assert c == clip and q == 1.0
        records = 4 + ctx.node_id % 3
        flat, out, at = record_sums(ctx.node_id, c, unclipped), {}, 0
        for k, shape in SHAPES.items():
            size = int(np.prod(shape))
            out[k] = flat[at : at + size].reshape(shape).astype(np.float32)
            at += size
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in out.items()}),
                                   "metrics": MetricRecord({"num-examples": records, "privfer-records": records})}),
                       reply_to=msg)

    return app


def record_policies(tmp_path):
    return lambda ctx: NodePrivacy(ledger=tmp_path / f"record-{ctx.node_id}.json", lifetime_epsilon=1000.0,
                                   delta=DELTA, unit="record")


def test_record_level_nodes_noise_the_clipped_gradient_sums_and_the_server_steps(tmp_path):
    dp = DistributedDP(epsilon=500.0, rounds=1, delta=DELTA, unit="record", max_grad_norm=1.0, max_records=1000,
                       server_lr=0.01)
    secure = SemiHonestGrid(LocalGrid(record_app(record_policies(tmp_path), 1.0), 5), dp=dp)
    arrays = run(secure)
    (report,) = secure.reports
    assert report.aborted is None and len(report.included) == 5
    assert report.example_count == sum(4 + n % 3 for n in secure.grid.node_ids)  # the exact, public count
    # the reply is one plain gradient step, server_lr against the noisy mean gradient over the public batch
    # (sample rate 1 x the records), with no optimizer of its own: FedAvg's result moves each coordinate in
    # proportion to the gradient (an Adam here would move every coordinate by about lr, whatever the gradient)
    moved = np.concatenate([arrays[k].ravel() for k in SHAPES])
    total = sum(record_sums(node, 1.0) for node in secure.grid.node_ids)
    expected = -0.01 * total / report.example_count
    plan = dp.plan(5, DIMENSION)  # the noise and the rounding in the sum: 6 standard deviations in step units
    noise = 0.01 * 6 * np.sqrt(plan.mu + 5 / 4) / (plan.scale * report.example_count)
    assert np.allclose(moved, expected, atol=noise), np.abs(moved - expected).max()
    assert np.abs(moved).max() < 0.1 * 0.01  # an Adam step of lr 0.01 would have moved every coordinate by ~0.01
    for node in secure.grid.node_ids:
        ledger = json.loads((tmp_path / f"record-{node}.json").read_text())
        assert ledger["unit"] == "record" and ledger["mechanism_id"] == "distributed" and ledger["rounds"] == 1
    # Flower's own server optimizer is then the only one: FedAdam's pseudo-gradient (its first moment over
    # 1 - beta_1) is exactly the grid's linear step, not an already-adapted one
    (tmp_path / "adam").mkdir()
    adam_grid = SemiHonestGrid(LocalGrid(record_app(record_policies(tmp_path / "adam"), 1.0), 5), dp=dp)
    adam = FedAdam(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=5, eta=0.05, tau=1e-9)
    adam.start(grid=adam_grid, initial_arrays=initial(), num_rounds=1, timeout=5)
    pseudo = np.concatenate([np.asarray(adam.m_t[k]).ravel() / (1 - adam.beta_1) for k in SHAPES])
    assert np.allclose(pseudo, expected, atol=noise), np.abs(pseudo - expected).max()
    # a ClientApp that does not clip per example is refused (its sum is above records x C), with a fixed text
    # (the details could tell the data) and the round paid for
    (tmp_path / "u").mkdir()
    unclipped = SemiHonestGrid(LocalGrid(record_app(record_policies(tmp_path / "u"), 1.0, unclipped=True), 5), dp=dp)
    run(unclipped)
    assert all("failed after training" in r for r in unclipped.reports[-1].dropped.values())
    assert all(json.loads(f.read_text())["rounds"] == 1 for f in (tmp_path / "u").glob("record-*.json"))
    # a person-level node refuses a record-level plan, and the reverse
    (tmp_path / "p").mkdir()
    mixed = SemiHonestGrid(LocalGrid(make_app(policies(tmp_path / "p", 100.0)), 5), dp=dp)
    run(mixed)
    assert all("distributed_person plan" in r for r in mixed.reports[-1].dropped.values())


def test_the_node_ledger_is_typed_and_reads_back_what_it_wrote(tmp_path):
    """The node ledger's model: what the node writes validates and reads back byte for byte; a ledger written
    before the 'noise' field existed is the legacy family's; a round id no ledger can hold is refused before the
    file changes."""
    from privfer.privacy.ledger.node import NodeLedgerRecord

    policy = NodePrivacy(ledger=tmp_path / "ledger.json", lifetime_epsilon=10.0, delta=DELTA)
    ledger = NodeLedger(policy)
    assert ledger.load().rounds == 0 and not (tmp_path / "ledger.json").exists()  # fresh, nothing written yet
    entry = NoiseSteps(1e6, 1e3, 1e3, 1.0, 1)
    ledger.charge(entry, "r1")
    ledger.charge(entry, "r2")
    text = (tmp_path / "ledger.json").read_text()
    record = ledger.load()
    assert isinstance(record, NodeLedgerRecord) and record.rounds == 2 and record.last[0] == "r2"
    assert json.loads(text) == record.document()
    assert list(record.document()) == ["schema", "unit", "mechanism_id", "noise", "delta", "lifetime_epsilon",
                                       "rounds", "epsilon", "history", "last"]
    legacy = {k: v for k, v in record.document().items() if k != "noise"}
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    assert NodeLedger(replace(policy, ledger=tmp_path / "legacy.json")).spent() == pytest.approx(ledger.spent())
    with pytest.raises(NodeLedgerError, match="round is refused and the ledger is unchanged"):
        ledger.charge(entry, "r" * 5000)
    assert (tmp_path / "ledger.json").read_text() == text


def test_damaged_numbers_in_a_node_ledger_refuse_training_instead_of_crashing_the_node(tmp_path):
    """Hostile review of the typed ledger: a history entry the accountant cannot compute with (l2 of 1e160
    overflowed), an entry of zero steps (which no round writes), a 5000-digit number, a boolean budget."""
    policy = NodePrivacy(ledger=tmp_path / "ledger.json", lifetime_epsilon=10.0, delta=DELTA)
    ledger = NodeLedger(policy)
    entry = NoiseSteps(1e6, 1e3, 1e3, 1.0, 1)
    ledger.charge(entry, "r1")
    stored = ledger.load().document()
    for history, why in (([[1e6, 1e3, 1e160, 1.0, 1]], "mu, l1, l2 in"), ([[1e6, 1e3, 1e3, 1.0, 0]], "steps >= 1")):
        (tmp_path / "bad.json").write_text(json.dumps({**stored, "history": history}))
        with pytest.raises(NodeLedgerError, match=why):
            NodeLedger(replace(policy, ledger=tmp_path / "bad.json")).spent()
    (tmp_path / "bad.json").write_text(json.dumps(stored).replace('"rounds": 1', '"rounds": ' + "1" * 5000))
    with pytest.raises(NodeLedgerError, match="bad.json cannot be read"):
        NodeLedger(replace(policy, ledger=tmp_path / "bad.json")).spent()
    (tmp_path / "bad.json").write_text(json.dumps({**stored, "epsilon": float("nan")}))
    with pytest.raises(NodeLedgerError, match="field 'epsilon' must be a finite number"):
        NodeLedger(replace(policy, ledger=tmp_path / "bad.json")).spent()
    with pytest.raises(PrivferError, match="lifetime_epsilon must be a number"):
        NodePrivacy(ledger=tmp_path / "x.json", lifetime_epsilon=True, delta=DELTA)


def test_an_accountant_failure_is_a_refusal(tmp_path, monkeypatch):
    policy = NodePrivacy(ledger=tmp_path / "ledger.json", lifetime_epsilon=10.0, delta=DELTA)
    ledger = NodeLedger(policy)

    def overflow(*args, **kwargs):
        raise OverflowError("(34, 'Numerical result out of range')")

    monkeypatch.setattr(type(ledger.family), "epsilon", overflow)
    with pytest.raises(NodeLedgerError, match="cannot be accounted .OverflowError.; refusing to train"):
        ledger.check(NoiseSteps(1e6, 1e3, 1e3, 1.0, 1))
    assert not (tmp_path / "ledger.json").exists()
