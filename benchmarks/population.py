"""What one person-level round costs each client as the population grows: neighbours, bytes, seconds.

    python benchmarks/population.py                     # n = 100, 300, 1000, 3000, 10000 (about 10 minutes)
    python benchmarks/population.py --sizes 100,1000    # a quicker look

For each population size n, one round of person-level distributed DP with
every person selected: each client's clipped update of the smaller VFER
(configs/study-population.yaml: 8 frames x 64 features, 16 hidden units; its
shared dimension d) is encoded with its Skellam share and summed by the real
masking protocol on the SecAgg+ (Harary) graph with group rosters (each client
receives its group's keys only), in one process. Printed side by side per n:
the graph degree k (neighbours per client), the bytes a client sends and
receives, what it would receive with the full roster instead (the broadcasts
of the same round's keys and survivors), the mean client seconds of the
protocol (all four stages), the server's seconds, and how each grows relative to the smallest n
(the per-client figures should follow log n, not n). Local training is
measured separately per client on real synthetic data (it does not depend on
n), one client after the other and all stacked (privfer.fl.batched).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np


def round_cost(n: int, dimension: int) -> dict[str, float]:
    from privfer.config import AggregationConfig
    from privfer.privacy.person import person_contribution, secret_coin
    from privfer.privacy.distributed import calibrate_distributed, noise_generator
    from privfer.secagg import aggregate
    from privfer.secagg.messages import GroupRoster, GroupUnmaskRequest, KeyRoster, UnmaskRequest

    aggregation = AggregationConfig(roster="group", security="semi_honest")  # active + group: not built yet
    plan = calibrate_distributed(epsilon=3.0, delta=1 / (10 * n), max_grad_norm=0.5, dimension=dimension,
                                 sample_rate=1.0, steps=20, clients=n, records=n,
                                 min_inputs_fraction=aggregation.min_inputs_fraction,
                                 colluding_fraction=aggregation.colluding_fraction, rounding_overhead=0.01,
                                 modulus_bits=32, max_noise_multiplier=50.0)
    rng = np.random.default_rng(n)
    updates = {}
    encode_started = time.perf_counter()
    for client in range(1, n + 1):
        own = noise_generator()
        update = rng.normal(0, 0.01, dimension)
        updates[client] = [person_contribution(update, secret_coin(own, 1.0), plan, own)]
    encode = (time.perf_counter() - encode_started) / n
    config = aggregation.round_config(n, integer_sum_bound=plan.sum_bound, min_inputs=plan.min_inputs)
    round_id = f"population-benchmark:{n}"
    started = time.perf_counter()
    result = aggregate(updates, config, round_id=round_id)
    seconds = time.perf_counter() - started
    times = result.times
    client_seconds = statistics.mean(sum(times.clients[stage].get(c, 0.0) for stage in times.clients)
                                     for c in updates)
    sent = statistics.mean(result.transcript.bytes_in_by_party().values())
    sample = list(updates)[:50]
    received = statistics.mean(result.transcript.bytes_out(c) for c in sample)
    # What the full roster would have cost each client instead: the broadcasts built from this round's keys and
    # survivors, in place of the group messages the client received.
    group_messages = [e for e in result.transcript.entries if e.direction == "out"
                      and isinstance(e.message, (GroupRoster, GroupUnmaskRequest))]
    keys = {c: k for e in group_messages if isinstance(e.message, GroupRoster) for c, k in e.message.keys.items()}
    broadcast = len(KeyRoster(round_id=round_id, sender=0, keys=keys).to_bytes()) + len(UnmaskRequest(
        round_id=round_id, sender=0, survivors=tuple(result.included), dropped=()).to_bytes())
    per_party = {}
    for e in group_messages:
        per_party[e.party] = per_party.get(e.party, 0) + e.size
    full = statistics.mean(result.transcript.bytes_out(c) - per_party[c] + broadcast for c in sample)
    return {"n": n, "k": config.degree, "sent": sent, "received": received, "full": full, "client": client_seconds,
            "encode": encode, "server": sum(times.server.values()), "round": seconds}


def training_cost(clients: int = 200) -> tuple[float, float]:
    """Seconds of one client's local training in a person-level round (the study's model and data): one client
    after the other (``FLClient.fit``), and all of them stacked (``privfer.fl.batched``), side by side."""
    import torch

    from privfer.config import load_config
    from privfer.fl.batched import fit_clients
    from privfer.fl.mechanisms import local_training
    from privfer.fl.rounds import TRAINING
    from privfer.fl.simulation import prepare_federation
    from privfer.models.vfer import VFER

    config = load_config(None, ["data.frames=8", "data.feature_dim=64", "model.hidden_size=16",
                                "federation.local_epochs=1", "federation.adaptation=false",
                                f"data.synthetic.actors={clients + 20}", "privacy.unit=person", "privacy.epsilon=3"])
    federation = prepare_federation(config)
    torch.manual_seed(0)
    start = VFER.from_config(config.model, federation.feature_dim).state_dict()
    shared = list(start)
    training = local_training(config, TRAINING, None)
    ids = sorted(federation.clients[TRAINING])[:clients]
    group = [federation.clients[TRAINING][c] for c in ids]
    began = time.perf_counter()
    for client in group:
        client.fit(config, start, shared, training, seed=client.client_id)
    one_by_one = (time.perf_counter() - began) / len(ids)
    began = time.perf_counter()
    fit_clients(group, config, [start] * len(group), shared, training, ids)
    return one_by_one, (time.perf_counter() - began) / len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,300,1000,3000,10000")
    parser.add_argument("--dimension", type=int, default=0, help="shared coordinates (default: the study's VFER)")
    args = parser.parse_args()
    import torch

    dimension = args.dimension
    if not dimension:
        from privfer.config import load_config
        from privfer.models.vfer import VFER

        config = load_config(None, ["data.frames=8", "data.feature_dim=64", "model.hidden_size=16",
                                    "privacy.unit=person", "privacy.epsilon=3"])
        dimension = sum(p.numel() for p in VFER.from_config(config.model, 64).parameters())
    print(f"person-level round, every person selected, d = {dimension} shared coordinates, SecAgg+ graph, "
          "32-bit words, 10% expected dropout sizing, no dropouts")
    one_by_one, stacked = training_cost()
    print(f"local training per client (1 epoch, torch threads {torch.get_num_threads()}): one by one {one_by_one:.4f} s, "
          f"stacked {stacked:.4f} s (x{one_by_one / stacked:.1f})")
    header = (f"{'n':>6} {'k':>4} | {'sent KB':>8} {'recv KB':>8} {'full KB':>8} | {'client s':>8} {'encode s':>8} | "
              f"{'server s':>8} {'round s':>8} | {'k/k0':>5} {'client/c0':>9} {'log n/log n0':>12} {'n/n0':>6}")
    print(header)
    print("-" * len(header))
    first = None
    for n in [int(x) for x in args.sizes.split(",")]:
        row = round_cost(n, dimension)
        first = first or row
        print(f"{n:>6} {row['k']:>4} | {row['sent'] / 1e3:>8.1f} {row['received'] / 1e3:>8.1f} {row['full'] / 1e3:>8.1f} | "
              f"{row['client']:>8.4f} {row['encode']:>8.4f} | {row['server']:>8.2f} {row['round']:>8.2f} | "
              f"{row['k'] / first['k']:>5.2f} {row['client'] / first['client']:>9.2f} "
              f"{math.log(n) / math.log(first['n']):>12.2f} {n / first['n']:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
