"""Flower's SecAgg+ and privfer's secure aggregation in the same Flower app, side by side in one run.

    python benchmarks/flower_secagg.py            # n in {3, 10} nodes, d = 200,000 float32 values, 3 rounds
    python benchmarks/flower_secagg.py --quick    # n = 3, 1 round (seconds)

The app is the same for every column: a ClientApp whose "training" adds a
node-specific step to the received model (so the timings are the aggregation's,
not the model's) and a server running FedAvg for a few rounds. Columns:

- plain       FedAvg without secure aggregation (the floor)
- flower      Flower's SecAgg+: legacy NumPyClient + ``secaggplus_mod``, ``SecAggPlusWorkflow`` (32-bit modulus)
- privfer-32  privfer: ``ClientApp(mods=[secagg_mod])`` + ``SecAggGrid(grid, modulus_bits=32, max_examples=128)``
              (a weight cap like Flower's ``max_weight=100``: the precision of the sum depends on it)
- privfer-64  privfer's defaults for Flower: 64-bit modulus, ``max_examples=65536`` (twice the words)

All run on privfer's LocalGrid: every node in this process with its Context
serialized between messages as on a SuperNode, every message through Flower's
protobuf (the bytes column counts those bytes both ways). Time is wall-clock
per round (all nodes and the server share this process: it is the total work
of a round). The last columns check each aggregate against the exact weighted
average. Both use a complete graph (Flower: ``num_shares = n``, threshold
n // 2 + 1; privfer: ``graph="complete"``, t = n // 2 + 1).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np

SHAPE = (400, 500)  # d = 200,000


def step(node: int, server_round: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng([node, server_round])
    return rng.normal(0, 0.01, SHAPE).astype(np.float32), 10 + node % 7


def initial() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 0.1, SHAPE).astype(np.float32)


def expected(nodes: list[int], rounds: int) -> np.ndarray:
    model = initial().astype(np.float64)
    for server_round in range(1, rounds + 1):
        steps = [step(node, server_round) for node in nodes]
        total = sum(count for _, count in steps)
        model = model + sum(delta.astype(np.float64) * count for delta, count in steps) / total
    return model


def run_new_api(n: int, rounds: int, mode: str) -> tuple[float, int, np.ndarray]:
    from flwr.client import ClientApp
    from flwr.common import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from privfer.integrations.flower import LocalGrid, SecAggGrid, secagg_mod

    app = ClientApp(mods=[secagg_mod] if mode != "plain" else [])

    @app.train()
    def train(msg, ctx):
        w = msg.content["arrays"]["w"].numpy()
        delta, count = step(ctx.node_id, int(msg.content["config"]["server-round"]))
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w + delta)}),
                                   "metrics": MetricRecord({"num-examples": count})}), reply_to=msg)

    grid = LocalGrid(app, n)
    # privfer-32 caps the weight like Flower's max_weight (the fixed-point precision depends on the cap)
    options = {"modulus_bits": 32, "max_examples": 128} if mode == "privfer-32" else {"modulus_bits": 64}
    served = grid if mode == "plain" else SecAggGrid(grid, protect=("train",), **options)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=n, min_train_nodes=n)
    started = time.perf_counter()
    result = strategy.start(grid=served, initial_arrays=ArrayRecord({"w": Array(initial())}), num_rounds=rounds)
    seconds = time.perf_counter() - started
    model = result.arrays["w"].numpy()
    return seconds / rounds, (grid.bytes_sent + grid.bytes_received) // rounds, model


def run_flower_secaggplus(n: int, rounds: int) -> tuple[float, int, np.ndarray]:
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, RecordDict, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from privfer.integrations.flower import LocalGrid

    class Node(NumPyClient):
        def __init__(self, node_id: int) -> None:
            self.node_id = node_id

        def fit(self, parameters, config):
            delta, count = step(self.node_id, int(config["server-round"]))
            return [parameters[0] + delta], count, {}

    def configure(server_round: int) -> dict:
        return {"server-round": server_round}

    app = ClientApp(client_fn=lambda context: Node(context.node_id).to_client(), mods=[secaggplus_mod])
    grid = LocalGrid(app, n)
    final: list[np.ndarray] = []

    class Keep(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
            if parameters is not None:
                final[:] = parameters_to_ndarrays(parameters)
            return parameters, metrics

    strategy = Keep(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                    initial_parameters=ndarrays_to_parameters([initial()]), on_fit_config_fn=configure)
    context = LegacyContext(context=Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=rounds), strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=n, reconstruction_threshold=n // 2 + 1,
                                                               max_weight=100.0))
    started = time.perf_counter()
    workflow(grid, context)
    seconds = time.perf_counter() - started
    return seconds / rounds, (grid.bytes_sent + grid.bytes_received) // rounds, final[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 3, 1 round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import flwr.common.logger  # noqa: F401 - configures Flower's logger; quiet it afterwards

    logging.getLogger("flwr").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    sizes, rounds = ([3], 1) if args.quick else ([3, 10], args.rounds)
    d = int(np.prod(SHAPE))
    print(f"d = {d:,} float32 values, {rounds} round(s) per cell; seconds and bytes are per round\n")
    header = (f"{'n':>3} | {'system':<10} | {'s/round':>8} {'MB/round':>9} | {'time ratio':>10} {'bytes ratio':>11} "
              f"| {'max |error|':>11}")
    print(header)
    print("-" * len(header))
    for n in sizes:
        truth = expected([1000 + i for i in range(n)], rounds)
        rows = {"plain": run_new_api(n, rounds, "plain"), "flower": run_flower_secaggplus(n, rounds),
                "privfer-32": run_new_api(n, rounds, "privfer-32"), "privfer-64": run_new_api(n, rounds, "privfer-64")}
        flower_seconds, flower_bytes, _ = rows["flower"]
        for system, (seconds, size, model) in rows.items():
            error = float(np.max(np.abs(model.astype(np.float64) - truth)))
            print(f"{n:>3} | {system:<10} | {seconds:>8.3f} {size / 1e6:>9.2f} | {seconds / flower_seconds:>9.2f}x "
                  f"{size / flower_bytes:>10.2f}x | {error:>11.2e}")
    print("\nratios: each system / Flower's SecAgg+ in the same run (below 1: privfer is cheaper)")


if __name__ == "__main__":
    main()
