"""The Flower example app in process (privfer's LocalGrid): the same training as `privfer simulate`, and a private
FedPer run whose nodes compose their privacy budget over rounds in their own Context."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason='the Flower integration needs pip install -e ".[flower]"')

from flwr.common import Context, RecordDict  # noqa: E402

from privfer.fl.simulation import simulate  # noqa: E402
from privfer.integrations.flower import STATE, LocalGrid  # noqa: E402
from privfer.privacy.calibrate import epsilon_spent  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "flower"
sys.path.insert(0, str(EXAMPLE))

from privfer_flower.client_app import ACCOUNT, PERSONAL  # noqa: E402
from privfer_flower.client_app import app as client_app  # noqa: E402
from privfer_flower.server_app import main  # noqa: E402
from privfer_flower.task import privfer_config  # noqa: E402

SMALL = ("data.frames=8 data.feature_dim=64 data.synthetic.actors=24 data.synthetic.missing_clips=0 "
         "data.split.val_actors=4 data.split.test_actors=8 model.hidden_size=16 federation.local_epochs=1 "
         "training.batch_size=32 privacy.accountant=rdp")  # RDP calibrates in half PRV's time
TRAINING_ACTORS = 24 - 4 - 8


def run_config(tmp_path, **values) -> dict:
    config = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config.update({"privfer-set": SMALL, "result-file": str(tmp_path / "result.json"), **values})
    return config


def run_app(run_config: dict, nodes: int, server_config: dict | None = None, ledgers: Path | None = None,
            **node_config) -> tuple[dict, LocalGrid]:
    def own(index: int) -> dict:
        ledger = ({"ledger": str(ledgers / f"node-{index}.json"), "lifetime-epsilon": 3.0}
                  if ledgers is not None else {})
        return {"partition-id": index, "num-partitions": nodes, **ledger, **node_config}

    grid = LocalGrid(client_app, nodes, run_config=run_config, node_config=own)
    main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                       run_config=server_config or run_config))
    return json.loads(Path(run_config["result-file"]).read_text()), grid


def test_the_flower_app_trains_exactly_as_privfer_simulate(tmp_path):
    """Without DP both use the same seeds, initial model and weights: the same model, the same test scores."""
    values = {"epsilon": "inf", "num-server-rounds": 2, "min-nodes": TRAINING_ACTORS}
    flower, _ = run_app(run_config(tmp_path, **values), TRAINING_ACTORS)
    config = privfer_config(run_config(tmp_path, **values))
    config = config.model_copy(update={"federation": config.federation.model_copy(
        update={"clients_per_round": TRAINING_ACTORS, "keep_best_round": False})})  # the app keeps its last round
    simulated = simulate(config)
    final = flower["server_evaluation"]["2"]
    assert final["macro-f1"] == pytest.approx(simulated.test["macro"]["f1"], abs=1e-12)
    assert final["micro-f1"] == pytest.approx(simulated.test["micro"]["f1"], abs=1e-12)
    assert flower["server_evaluation"]["2"] != flower["server_evaluation"]["0"]
    assert flower["epsilon_target"] is None and flower["delta"] is None


def test_private_fedper_nodes_compose_their_budget_and_keep_their_heads(tmp_path):
    values = {"epsilon": "2", "num-server-rounds": 2, "strategy": "fedper", "min-nodes": 3, "mechanism": "local"}
    result, grid = run_app(run_config(tmp_path, **values), 3)
    assert result["epsilon_target"] == 2.0
    assert result["client_evaluation"] == {}  # a private run releases no (not DP-protected) accuracy
    assert [len(r["included"]) for r in result["secure_aggregation"]] == [3, 3]
    delta = result["delta"]
    for node in grid.node_ids:
        state = grid.context(node).state
        assert STATE not in state.config_records  # no round keys left behind
        assert PERSONAL in state.array_records  # the head stayed on the node
        account = state.config_records[ACCOUNT]
        history = [tuple(step) for step in json.loads(account["history"])]
        assert {sigma for sigma, _, _ in history} == {account["noise_multiplier"]}  # round 2 reused round 1's
        # both rounds composed (Opacus merges equal (sigma, q) entries): 2 rounds x 1 epoch x 1/q steps
        assert sum(steps for _, _, steps in history) == 2 * round(1 / history[0][1])
        assert 0.9 * 2.0 <= epsilon_spent(history, delta, "rdp") <= 2.0 + 1e-6  # the whole budget, not more


def test_nodes_stop_at_their_budget_whatever_the_server_asks(tmp_path):
    """The nodes' run config plans 2 rounds; a server that runs 3 gets no third update."""
    values = {"epsilon": "2", "num-server-rounds": 2, "min-nodes": 3, "mechanism": "local"}
    server = run_config(tmp_path, **{**values, "num-server-rounds": 3})
    result, grid = run_app(run_config(tmp_path, **values), 3, server_config=server)
    assert [r["aborted"] is None for r in result["secure_aggregation"]] == [True, True, False]
    assert all("another round would spend" in reason for reason in result["secure_aggregation"][2]["dropped"].values())
    for node in grid.node_ids:
        history = json.loads(grid.context(node).state.config_records[ACCOUNT]["history"])
        assert epsilon_spent([tuple(step) for step in history], result["delta"], "rdp") <= 2.0 + 1e-6


@pytest.mark.parametrize("epsilon, ceiling, refusal", [
    ("8", {"max-epsilon": 4.0}, "epsilon <= 4.0"),
    ("inf", {"max-epsilon": 4.0}, "epsilon no DP"),
    ("2", {"max-delta": 1e-9}, "delta <"),
])
def test_a_node_refuses_a_run_above_its_own_ceilings(tmp_path, epsilon, ceiling, refusal):
    values = {"num-server-rounds": 1, "min-nodes": 3, "mechanism": "local"}
    result, _ = run_app(run_config(tmp_path, epsilon=epsilon, **values), 3, **ceiling)
    (report,) = result["secure_aggregation"]
    assert report["aborted"] and all(refusal in reason for reason in report["dropped"].values())


def test_without_dp_fedper_nodes_report_their_personal_accuracy_securely(tmp_path):
    values = {"epsilon": "inf", "num-server-rounds": 1, "strategy": "fedper", "min-nodes": 3}
    result, _ = run_app(run_config(tmp_path, **values), 3)
    assert [r["message_type"] for r in result["secure_aggregation"]] == ["train", "evaluate"]
    assert 0.0 <= result["client_evaluation"]["1"]["accuracy"] <= 1.0
    assert "train-loss" in result["train_metrics"]["1"]


def test_by_default_nodes_add_their_own_noise_and_keep_their_lifetime_ledgers(tmp_path):
    """Person-level distributed DP: every node's ledger on its own disk; a second run on the same nodes (new
    processes, the same files) finds the lifetime budget spent and is refused before any training."""
    from privfer.integrations.flower import NodeLedger, NodePrivacy

    values = {"epsilon": "3", "num-server-rounds": 2, "min-nodes": 3}
    result, grid = run_app(run_config(tmp_path, **values), 3, ledgers=tmp_path)
    assert result["mechanism"] == "distributed" and result["unit"] == "person" and result["delta"] == 1e-5
    assert [len(r["included"]) for r in result["secure_aggregation"]] == [3, 3]
    assert all(r["example_count"] == 0 for r in result["secure_aggregation"])  # no count left a node
    assert result["server_evaluation"]["2"] != result["server_evaluation"]["0"]
    for index in range(3):
        ledger = NodeLedger(NodePrivacy(ledger=tmp_path / f"node-{index}.json", lifetime_epsilon=3.0, delta=1e-5))
        assert ledger.load().rounds == 2 and 0.9 * 3.0 <= ledger.spent() <= 3.0 + 1e-9
    again, _ = run_app(run_config(tmp_path, **values), 3, ledgers=tmp_path)
    first = again["secure_aggregation"][0]
    assert first["included"] == [] and all("lifetime" in reason for reason in first["dropped"].values())
    assert all(reason.startswith("advertise_keys:") for reason in first["dropped"].values())  # before training
