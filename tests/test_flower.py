"""privfer's secure aggregation inside Flower: same aggregate as privfer's own driver and as plain FedAvg, dropouts at
every stage, a strict client mod, and a server that receives only masked vectors."""

from __future__ import annotations

import functools

import logging

import numpy as np
import pytest

pytest.importorskip("flwr", reason='the Flower integration needs pip install -e ".[flower]"')

from flwr.client import ClientApp  # noqa: E402
from flwr.common import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from privfer.integrations.flower import (  # noqa: E402
    RECORD,
    STATE,
    LocalGrid,
    SecAggGrid,
    make_secagg_mod,
    secagg_mod,
)

from privfer.secagg import SecAggConfig, aggregate  # noqa: E402

SemiHonestGrid = functools.partial(SecAggGrid, security="semi_honest")  # active security: test_flower_active.py

SHAPES = {"w": (6, 5), "b": (5,)}
M = 1 << 16


def local_update(node: int, server_round: int, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Deterministic 'training': a node-specific step from the received arrays, and a node-specific count."""
    rng = np.random.default_rng([node, server_round])
    count = 5 + node % 11
    return {k: (v + rng.normal(0, 0.5, v.shape)).astype(np.float32) for k, v in arrays.items()}, count


def make_app(mods=()):
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, ctx) -> Message:
        received = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        local, count = local_update(ctx.node_id, int(msg.content["config"]["server-round"]), received)
        loss = 1.0 + (ctx.node_id % 5) / 10
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in local.items()}),
                                   "metrics": MetricRecord({"num-examples": count, "loss": loss, "private": 3.0})}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, ctx) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 2 + ctx.node_id % 3,
                                                            "accuracy": (ctx.node_id % 4) / 4})}), reply_to=msg)

    return app


def initial() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array(rng.normal(0, 1, s).astype(np.float32)) for k, s in SHAPES.items()})


def run(grid, rounds=1, **strategy) -> tuple:
    result = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, **strategy).start(
        grid=grid, initial_arrays=initial(), num_rounds=rounds, timeout=5)
    return {k: a.numpy() for k, a in result.arrays.items()}, result


def expected_average(nodes, server_round=1):
    start = {k: a.numpy() for k, a in initial().items()}
    updates = {node: local_update(node, server_round, start) for node in nodes}
    total = sum(count for _, count in updates.values())
    return {k: sum(u[k].astype(np.float64) * c for u, c in updates.values()) / total for k in SHAPES}, updates


def test_same_aggregate_as_plain_fedavg_and_as_privfers_driver():
    grid = LocalGrid(make_app([secagg_mod]), 5)
    secure = SemiHonestGrid(grid, train_metrics=("loss",), evaluate_metrics=("accuracy",))
    arrays, result = run(secure)
    plain, plain_result = run(LocalGrid(make_app(), 5))
    average, updates = expected_average(grid.node_ids)

    config = SecAggConfig(num_clients=5, modulus_bits=64, clipping_range=8.0, max_examples=M)
    start = {k: a.numpy().astype(np.float64) for k, a in initial().items()}
    ids = {node: i + 1 for i, node in enumerate(grid.node_ids)}
    driver = aggregate({ids[n]: [(u[k] - start[k]) * c / M for k in SHAPES] for n, (u, c) in updates.items()}, config,
                       example_counts={ids[n]: c for n, (u, c) in updates.items()})
    from_driver = {k: start[k] + t * M / driver.example_count for k, t in zip(SHAPES, driver.total)}
    bound = driver.error_bound * M / driver.example_count + 1e-6  # + float32 rounding of the result
    for k in SHAPES:
        assert arrays[k].dtype == np.float32
        np.testing.assert_allclose(arrays[k], from_driver[k], atol=bound, rtol=0)
        np.testing.assert_allclose(arrays[k], plain[k], atol=bound, rtol=0)
        np.testing.assert_allclose(arrays[k], average[k], atol=bound, rtol=0)
    total = sum(c for _, c in updates.values())
    assert secure.reports[0].example_count == total == driver.example_count
    metric_bound = 5 * 2.0 ** -config.metric_precision_bits * M / total  # stochastic rounding, rescaled by M / N
    loss = result.train_metrics_clientapp[1]["loss"]
    assert loss == pytest.approx(plain_result.train_metrics_clientapp[1]["loss"], abs=metric_bound)
    assert "private" not in result.train_metrics_clientapp[1]  # undeclared metrics never leave the node
    accuracy = result.evaluate_metrics_clientapp[1]["accuracy"]
    evaluated = sum(2 + node % 3 for node in grid.node_ids)
    assert accuracy == pytest.approx(plain_result.evaluate_metrics_clientapp[1]["accuracy"],
                                     abs=5 * 2.0 ** -config.metric_precision_bits * M / evaluated)


@pytest.mark.parametrize("answered", [0, 1, 2, 3])
def test_a_node_that_vanishes_at_any_stage_is_left_out_exactly(answered):
    grid = LocalGrid(make_app([secagg_mod]), 5, answers={1002: answered})
    secure = SemiHonestGrid(grid, protect=("train",))
    arrays, _ = run(secure)
    report = secure.reports[0]
    stage = ("advertise_keys", "share_keys", "masked_input", "unmask")[answered]
    assert report.dropped == {1002: f"{stage}: no reply before the timeout"}
    # a node lost after sending its masked input (unmask) is still in the sum: its self mask is recovered
    included = [n for n in grid.node_ids if n != 1002 or stage == "unmask"]
    assert report.included == included
    average, _ = expected_average(included)
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k], average[k], atol=1e-5, rtol=0)


def test_the_server_receives_only_masked_vectors():
    seen: list[Message] = []

    class Recording(LocalGrid):
        def pull_messages(self, message_ids):
            replies = list(super().pull_messages(message_ids))
            seen.extend(replies)
            return replies

    grid = Recording(make_app([secagg_mod]), 4)
    run(SemiHonestGrid(grid, train_metrics=("loss",), evaluate_metrics=("accuracy",)))
    assert len(seen) == 2 * 4 * 4  # train + evaluate, 4 stages, 4 nodes
    for reply in seen:
        assert not reply.has_error()
        assert not reply.content.array_records and not reply.content.metric_records
        assert list(reply.content.config_records) == [RECORD]
    for node in grid.node_ids:  # and no node keeps its round keys once the round is over
        assert STATE not in grid.context(node).state.config_records


def test_the_mod_refuses_a_train_message_without_secure_aggregation():
    grid = LocalGrid(make_app([secagg_mod]), 3)
    arrays, result = run(grid)  # a server that forgot SecAggGrid
    assert arrays == {} and 1 not in result.train_metrics_clientapp  # nothing was aggregated
    # a mod that does not require evaluate lets plain evaluate messages through
    relaxed = LocalGrid(make_app([make_secagg_mod(require=("train",))]), 3)
    secure = SemiHonestGrid(relaxed, protect=("train",))
    arrays, result = run(secure)
    assert set(arrays) == set(SHAPES) and [r.message_type for r in secure.reports] == ["train"]
    assert "accuracy" in result.evaluate_metrics_clientapp[1]  # evaluated in the clear, as this server asked


def test_a_round_below_the_threshold_aborts_and_keeps_the_model():
    grid = LocalGrid(make_app([secagg_mod]), 3, answers={1000: 0, 1001: 0})
    secure = SemiHonestGrid(grid, protect=("train",))
    arrays, _ = run(secure)
    assert secure.reports[0].aborted and not secure.reports[0].included
    assert arrays == {}  # the strategy got only error replies: no new model


def test_nodes_with_bad_replies_drop_out_with_the_reason(caplog):
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg, ctx):
        arrays = msg.content["arrays"]
        metrics = {"num-examples": 4}
        if ctx.node_id == 1000:
            metrics = {}  # no weight
        if ctx.node_id == 1001:
            arrays = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))})  # other shapes
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

    grid = LocalGrid(app, 5)
    secure = SemiHonestGrid(grid, protect=("train",))
    with caplog.at_level(logging.INFO, logger="privfer.flower"):
        run(secure)
    dropped = secure.reports[0].dropped
    assert "num-examples" in dropped[1000] and "ShapeMismatch" in dropped[1001]
    assert secure.reports[0].included == [1002, 1003, 1004]


def test_a_stage_for_another_round_or_without_state_is_refused():
    app = make_app([secagg_mod])
    grid = LocalGrid(app, 3)
    message = grid.create_message(RecordDict({RECORD: ConfigRecord({"stage": "unmask", "round": "r", "message": b""})}),
                                  "train", 1000, "1")
    reply = list(grid.send_and_receive([message]))[0]
    assert reply.has_error() and "holds no secure-aggregation round" in reply.error.reason


def test_bad_secagg_grid_arguments_are_named():
    grid = LocalGrid(make_app(), 2)
    with pytest.raises(TypeError, match="unknown SecAggConfig fields"):
        SemiHonestGrid(grid, modulus=64)
    with pytest.raises(TypeError, match="num_clients"):
        SemiHonestGrid(grid, num_clients=3)
    with pytest.raises(ValueError, match="weight"):
        SemiHonestGrid(grid, train_metrics=("num-examples",))
    with pytest.raises(ValueError, match="at least 2 nodes"):
        SemiHonestGrid(grid).send_and_receive([grid.create_message(RecordDict(), "train", 1000, "1")])
    with pytest.raises(TypeError, match="bypass"):
        SemiHonestGrid(grid).push_messages([grid.create_message(RecordDict(), "train", 1000, "1")])


def test_nodes_refuse_rounds_below_their_minimum_size():
    grid = LocalGrid(make_app([secagg_mod]), 2)  # the default mod takes part only with at least 3 nodes
    secure = SemiHonestGrid(grid, protect=("train",))
    arrays, _ = run(secure, min_available_nodes=2, min_train_nodes=2)
    assert arrays == {} and secure.reports[0].aborted
    assert all("at least 3" in reason for reason in secure.reports[0].dropped.values())
    relaxed = LocalGrid(make_app([make_secagg_mod(min_clients=2)]), 2)
    arrays, _ = run(SemiHonestGrid(relaxed, protect=("train",)), min_available_nodes=2, min_train_nodes=2)
    average, _ = expected_average(relaxed.node_ids)
    np.testing.assert_allclose(arrays["w"], average["w"], atol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        make_secagg_mod(min_clients=1)


def test_a_count_above_the_cap_is_capped_not_refused():
    """Refusing it would tell the server, by the error reply, whether the count exceeds a cap the server chose."""
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg, ctx):
        count = 70001 if ctx.node_id == 1000 else 4
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": count})}),
                       reply_to=msg)

    secure = SemiHonestGrid(LocalGrid(app, 4), protect=("train",))
    run(secure)
    assert secure.reports[0].dropped == {} and secure.reports[0].example_count == M + 3 * 4


def test_sub_typed_train_messages_are_protected_too():
    """Flower routes "train.default" to @app.train() (and "train.x" to @app.train("x")): protected like "train"."""
    grid = LocalGrid(make_app([secagg_mod]), 3)
    content = RecordDict({"arrays": initial(), "config": ConfigRecord({"server-round": 1})})
    reply = list(grid.send_and_receive([grid.create_message(content, "train.default", 1000, "1")]))[0]
    assert reply.has_error() and "UnprotectedMessage" in reply.error.reason
    secure = SemiHonestGrid(grid, protect=("train",))
    replies = list(secure.send_and_receive([grid.create_message(content, "train.default", n, "1") for n in grid.node_ids]))
    assert len(replies) == 1 and not replies[0].has_error() and secure.reports[0].included == grid.node_ids


def test_nodes_refuse_a_roster_smaller_than_their_minimum():
    grid = LocalGrid(make_app([secagg_mod]), 3, answers={1002: 0})  # config for 3, only 2 advertise keys
    secure = SemiHonestGrid(grid, protect=("train",))
    arrays, _ = run(secure)
    assert arrays == {} and secure.reports[0].aborted
    assert "roster lists 2 nodes" in secure.reports[0].dropped[1000]


def test_a_misrouted_masked_input_stage_is_refused_before_training():
    trained: list[int] = []
    counting = ClientApp(mods=[secagg_mod])

    @counting.train()
    def train(msg, ctx):
        trained.append(ctx.node_id)
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 3})}),
                       reply_to=msg)

    class Swapping(LocalGrid):
        """A server that delivers node 1000's share bundle to node 1001 and the other way round."""

        def push_messages(self, messages):
            messages = list(messages)
            records = {m.metadata.dst_node_id: m.content.config_records.get(RECORD) for m in messages}
            if all(r is not None and r["stage"] == "masked_input" for r in records.values()):
                records[1000]["message"], records[1001]["message"] = records[1001]["message"], records[1000]["message"]
            return super().push_messages(messages)

    secure = SemiHonestGrid(Swapping(counting, 4), protect=("train",))
    run(secure)
    dropped = secure.reports[0].dropped
    assert set(dropped) == {1000, 1001} and all("UnknownSender" in reason for reason in dropped.values())
    assert sorted(trained) == [1002, 1003]  # the two misrouted nodes spent no privacy budget on a doomed round


def test_abandoned_round_keys_expire():
    grid = LocalGrid(make_app([make_secagg_mod(state_ttl=1e-9)]), 3)
    secure = SemiHonestGrid(grid, protect=("train",))
    run(secure)  # every node's keys have expired by its next stage: the round cannot proceed
    assert secure.reports[0].aborted
    assert all("holds no secure-aggregation round" in reason for reason in secure.reports[0].dropped.values())
    for node in grid.node_ids:
        assert STATE not in grid.context(node).state.config_records


def test_integer_arrays_stay_integers():
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg, ctx):
        arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        arrays["steps"] = arrays["steps"] + 3
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                   "metrics": MetricRecord({"num-examples": 1 + ctx.node_id % 4})}), reply_to=msg)

    grid = LocalGrid(app, 3)
    content = RecordDict({"arrays": ArrayRecord({"steps": Array(np.array([7, 100], dtype=np.int64))}),
                          "config": ConfigRecord({"server-round": 1})})
    (reply,) = SemiHonestGrid(grid, protect=("train",)).send_and_receive(
        [grid.create_message(content, "train", node, "1") for node in grid.node_ids])
    steps = reply.content["arrays"]["steps"].numpy()  # (Flower's FedAvg then averages it in floating point)
    assert steps.dtype == np.int64 and steps.tolist() == [10, 103]


@pytest.mark.parametrize("answered", [None, 1, 3])
def test_group_rosters_give_the_same_average_on_a_sparse_graph(answered):
    nodes = 40
    answers = {} if answered is None else {1003: answered}
    grid = LocalGrid(make_app([secagg_mod]), nodes, answers=answers)
    secure = SemiHonestGrid(grid, protect=("train",), graph="harary", roster="group")
    arrays, _ = run(secure)
    report = secure.reports[0]
    included = [n for n in grid.node_ids if n != 1003 or answered in (None, 3)]
    assert report.included == included
    average, _ = expected_average(included)
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k], average[k], atol=1e-5, rtol=0)
    assert SecAggConfig(num_clients=nodes, graph="harary").degree < nodes - 1  # the graph really is sparse


@pytest.mark.parametrize("roster", ["full", "group"])
def test_the_recipe_and_the_grid_walk_the_same_stages(monkeypatch, roster):
    """Both drivers take their stages from privfer.secagg.stages.round_stages: a stage added there is run by both."""
    import dataclasses

    from privfer.integrations.flower import grid as grid_module
    from privfer.secagg import masking
    from privfer.secagg.stages import round_stages

    walked: dict[str, list[str]] = {"recipe": [], "grid": []}

    def recording(driver):
        def stages(config):
            def receive(stage):
                def wrapped(server, raw, cid):
                    if not walked[driver] or walked[driver][-1] != stage.name:
                        walked[driver].append(stage.name)
                    return stage.receive(server, raw, cid)
                return wrapped
            return tuple(dataclasses.replace(stage, receive=receive(stage)) for stage in round_stages(config))
        return stages

    monkeypatch.setattr(masking, "round_stages", recording("recipe"))
    monkeypatch.setattr(grid_module, "round_stages", recording("grid"))
    run(SemiHonestGrid(LocalGrid(make_app([secagg_mod]), 5), roster=roster))
    config = SecAggConfig(num_clients=5, security="semi_honest", roster=roster)
    aggregate({c: [np.ones(3)] for c in range(1, 6)}, config)
    expected = [stage.name for stage in round_stages(config)]
    assert walked["recipe"] == expected
    assert walked["grid"][:len(expected)] == expected  # (train, then evaluate: each one round)
