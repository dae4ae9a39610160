"""Where a round of distributed DP-SGD spends its time, and what the batched clipped sums save.

    python benchmarks/distributed_round.py                 # default data, epsilon 3, 3 rounds (about 1 minute)
    python benchmarks/distributed_round.py --strategy fedper

Part 1 runs ``--rounds`` real rounds of ``privfer simulate --epsilon 3``'s
training phase (every client's contribution through the masking protocol) and
splits each into: the clipped gradient sums, the clients' integer encoding and
Skellam shares, secure aggregation (clients and server, every message through
its byte encoding), and the rest (the server's step, the validation score).
The per client-round overhead is what privacy adds per client and round
beyond its gradients: its encoding, noise share and protocol work.

Part 2 measures, side by side on the same 2,048 clips and model, three ways
to get 67 clients' sums of per-example clipped gradients: privfer's batched
Gram-norm pass (one pass for all clients), the same function client by
client, and Opacus's per-sample gradients (``GradSampleModule``, the fast DP
LSTM's registered grad sampler) clipped and summed per client.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def part_one(args) -> None:
    from privfer.config import load_config
    from privfer.fl import simulation
    from privfer.fl.mechanisms import distributed as trainer  # where the round's trainer looks the round up
    from privfer.models.vfer import VFER

    config = load_config(None, [f"privacy.epsilon={args.epsilon}", f"federation.strategy={args.strategy}"])
    started = time.perf_counter()
    federation = simulation.prepare_federation(config)
    print(f"prepare (data, split, IFER, calibration): {time.perf_counter() - started:.1f} s")
    plan = federation.plans["training"]
    print(f"{plan.clients} clients per round, {plan.dimension} coordinates, scale 2^{math.log2(plan.scale):.0f}, "
          f"{plan.modulus_bits}-bit words, noise multiplier {plan.noise_multiplier:.2f}")
    torch.manual_seed(config.seed)
    initial = VFER.from_config(config.model, federation.feature_dim, private=True)
    state = simulation.RunState(global_state={k: v.detach().clone() for k, v in initial.state_dict().items()},
                              personal={}, accounts={})
    captured = []
    real = trainer.run_distributed_round

    def timed(**kwargs):
        result = real(**kwargs)
        captured.append(result)
        return result

    trainer.run_distributed_round = timed
    rows = []
    try:
        for round_index in range(1, args.rounds + 1):
            record = simulation._run_round(federation, state, "training", round_index)
            result = captured[-1]
            rest = record.seconds - result.seconds_gradients - result.seconds_encoding - result.seconds_aggregation
            rows.append((record.seconds, result.seconds_gradients, result.seconds_encoding,
                         result.seconds_aggregation, rest, record.bytes_per_client))
    finally:
        trainer.run_distributed_round = real
    names = ("round", "clipped sums", "encoding + noise", "secure aggregation", "server step + validation")
    print(f"\n| {' | '.join(names)} | bytes sent per client |")
    print("|" + "---|" * (len(names) + 1))
    for row in rows:
        print("| " + " | ".join(f"{v:.2f} s" for v in row[:5]) + f" | {row[5] / 1e6:.2f} MB |")
    mean = [statistics.mean(r[i] for r in rows) for i in range(5)]
    overhead = (mean[2] + mean[3]) / plan.clients
    gradient = mean[1] / plan.clients
    print(f"\nper client-round: gradients {gradient * 1000:.1f} ms, privacy overhead (encoding, noise share, "
          f"protocol) {overhead * 1000:.1f} ms = {overhead / gradient:.2f} x the gradients; "
          f"{args.rounds} rounds mean {mean[0]:.2f} s")


def part_two() -> None:
    from opacus import GradSampleModule

    from privfer.models.vfer import VFER
    from privfer.models.clipped_sums import clipped_gradient_sums
    from privfer.models.loss import LabelLoss

    torch.manual_seed(0)
    clients, per_client = 67, 30
    n = clients * per_client
    model = VFER(256, 64, readout="mean", fast_dp=True)
    x, y = torch.randn(n, 16, 256), torch.softmax(torch.randn(n, 6), -1)
    groups = torch.arange(clients).repeat_interleave(per_client)

    def batched():
        return clipped_gradient_sums(model, x, y, groups, clients, 1.0).sums

    def per_client_calls():
        for k in range(clients):
            chosen = groups == k
            clipped_gradient_sums(model, x[chosen], y[chosen], torch.zeros(per_client, dtype=torch.long), 1, 1.0)

    reference = GradSampleModule(VFER(256, 64, readout="mean", fast_dp=True), batch_first=True,
                                 loss_reduction="sum")
    reference._module.load_state_dict(model.state_dict())

    def opacus_per_sample():
        for start in range(0, n, 512):
            xb, yb, gb = x[start:start + 512], y[start:start + 512], groups[start:start + 512]
            LabelLoss("sum")(reference(xb), yb).backward()
            grads = [p.grad_sample for p in reference._module.parameters()]
            norms = torch.sqrt(sum((g.reshape(len(xb), -1) ** 2).sum(1) for g in grads))
            factors = (1.0 / (norms + 1e-6)).clamp(max=1.0)
            for g in grads:
                torch.zeros(clients, *g.shape[1:]).index_add_(0, gb, g * factors.view(-1, *[1] * (g.dim() - 1)))
            for p in reference._module.parameters():
                p.grad_sample = None
                p.grad = None

    timings = {}
    for name, fn in (("batched Gram-norm pass", batched), ("the same, client by client", per_client_calls),
                     ("Opacus per-sample gradients", opacus_per_sample)):
        fn()  # warm up
        best = min(_seconds(fn) for _ in range(3))
        timings[name] = best
    base = timings["batched Gram-norm pass"]
    print("\n67 clients x 30 clips, hidden 64: clipped gradient sums per client")
    print("| method | seconds | x batched |")
    print("|---|---|---|")
    for name, seconds in timings.items():
        print(f"| {name} | {seconds:.2f} | {seconds / base:.2f} |")


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategy", default="fedavg", choices=("fedavg", "fedper"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    part_one(args)
    part_two()


if __name__ == "__main__":
    main()
