"""The ServerApp: Flower's FedAvg over privfer's secure aggregation.

The line that makes a Flower ServerApp use privfer's secure aggregation is
``strategy.start(grid=SecAggGrid(grid), ...)``: every train (and evaluate)
exchange runs privfer's four protocol stages, and the strategy sees only the
average of the surviving nodes' updates. Under distributed DP (the default,
person level) ``SecAggGrid(grid, dp=DistributedDP(...))`` sends each round's
noise plan; the nodes add their own shares, and the strategy receives the
received model plus the noisy mean of the clipped updates.

Under FedAvg the server scores the global model on the held-out test actors'
evaluation halves after every round (macro F1, as ``privfer simulate`` does).
Under FedPer the heads stay on the nodes: without DP the nodes score their
personalized models on their own clips and the server sees the securely
averaged accuracy; a private run releases no such score (it is not
DP-protected). With ``result-file`` set, the ServerApp writes a JSON summary
atomically.

Active security (run config ``roster-certificate`` and ``authority-key``: the
study's certificate from ``privfer enroll`` and the authority's public key):
every node is an enrolled member (its node config names its ``identity-key``,
the same certificate and the authority key it pins), advertisements are signed,
and every survivor signs its view of each round — the model it received
included — before any share is revealed. Without them the grid runs the
semi-honest protocol and says so in its log and its reports.
"""

from __future__ import annotations

from pathlib import Path
import time
from dataclasses import asdict

from flwr.common import ArrayRecord, Context, MetricRecord
from flwr.server import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from privfer.data.labels import evaluation_labels
from privfer.evaluation import predict
from privfer.integrations.flower import SecAggGrid, log
from privfer.metrics import classification_report
from privfer.secagg.identity import RosterCertificate, load_public
from privfer.models.vfer import VFER
from privfer.runs import atomic_write_json

from privfer_flower.task import (from_record, initial_state, mechanism_of, server_dp, server_federation,
                                 shared_names, to_record)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    fed, config = server_federation(run_config)  # config: the run's, with its budget (fed.config has none)
    private = config.privacy.enabled
    shared = shared_names(config, fed.feature_dim)
    initial = initial_state(config, fed.feature_dim)
    nodes = int(run_config.get("min-nodes", 3))
    global_model = fed.strategy.one_global_model  # FedPer: the heads are on the nodes, no global model
    strategy = FedAvg(
        fraction_train=float(run_config.get("fraction-train", 1.0)),
        fraction_evaluate=1.0 if not global_model and not private else 0.0,  # nodes score only without DP
        min_train_nodes=3,  # secagg_mod's min_clients: smaller samples would abort
        min_evaluate_nodes=3,
        min_available_nodes=nodes,
    )
    dp = server_dp(run_config)  # person-level distributed DP (the default); None: local DP-SGD or no DP
    certificate_path = str(run_config.get("roster-certificate", ""))
    if certificate_path:  # active security: the study's roster, checked against the authority's key
        certificate = RosterCertificate.load(Path(certificate_path).read_bytes(),
                                             load_public(str(run_config.get("authority-key", ""))))
        security = {"certificate": certificate}
    else:
        log.warning("no roster-certificate in the run config: SEMI-HONEST secure aggregation (the server is "
                    "trusted to follow the protocol)")
        security = {"security": "semi_honest"}
    secure = SecAggGrid(
        grid,
        train_metrics=() if private else ("train-loss",),
        evaluate_metrics=("accuracy",),
        dp=dp,
        **security,
    )
    test = fed.parts["test_eval"]  # the test actors' evaluation halves, as privfer simulate scores

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if not global_model:
            return None  # the heads are on the nodes
        model = VFER.from_config(config.model, fed.feature_dim, private=private)
        model.load_state_dict({**initial, **from_record(arrays)})
        report = classification_report(evaluation_labels(test, config.data.eval_target),
                                       predict(model, test.features).argmax(axis=1))
        return MetricRecord({"macro-f1": report["macro"]["f1"], "micro-f1": report["micro"]["f1"]})

    started = time.perf_counter()
    result = strategy.start(
        grid=secure,
        initial_arrays=to_record(initial, shared),
        num_rounds=int(run_config.get("num-server-rounds", 3)),
        timeout=float(run_config.get("timeout", 600.0)),
        evaluate_fn=evaluate_fn,
    )
    path = str(run_config.get("result-file", ""))
    if path:
        atomic_write_json(Path(path), {
            "strategy": config.federation.strategy,
            "rounds": int(run_config.get("num-server-rounds", 3)),
            "mechanism": (mechanism_of(run_config) if private else None),
            "unit": ("person" if dp is not None else "record") if private else None,
            "epsilon_target": config.privacy.epsilon if private else None,  # per node, whole run
            "delta": (dp.delta if dp is not None else fed.delta) if private else None,
            "server_evaluation": {str(r): dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
            "client_evaluation": {str(r): dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
            "train_metrics": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
            "secure_aggregation": [asdict(report) for report in secure.reports],
            "seconds": time.perf_counter() - started,
        })
