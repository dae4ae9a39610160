"""Utility check: the VFER trained with DP-SGD using FastDPLSTM vs Opacus DPLSTM at the same epsilon.

    python benchmarks/dp_lstm_utility.py                 # 3 seeds, epsilon 8, 3 epochs (about 6 minutes)
    python benchmarks/dp_lstm_utility.py --seeds 5 --epsilon 4

Centralized DP-SGD (record-level, Opacus PrivacyEngine.make_private_with_epsilon,
Poisson sampling, max_grad_norm 1, PRV accountant) on the default synthetic
data's training actors, partial labels and KL loss, batch 64, Adam lr 3e-3; the
macro F1 on the test actors' evaluation halves. Both layers compute the same
function; only how Opacus gets per-sample gradients differs, so their
accuracies should agree within seed-to-seed noise.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

from privfer.data.labels import training_targets
from privfer.evaluation import evaluate
from privfer.models.loss import label_loss
from privfer.config import load_config
from privfer.data import load_clips
from privfer.data.splits import split_run
from privfer.models.vfer import VFER

warnings.filterwarnings("ignore")


def train(kind: str, seed: int, epsilon: float, epochs: int, clips, parts, config) -> tuple[float, float, float]:
    from opacus import PrivacyEngine
    from opacus.layers import DPLSTM

    torch.manual_seed(seed)
    model = VFER.from_config(config.model, clips.feature_dim, private=(kind == "fast"))
    if kind == "dplstm":
        model.lstm = DPLSTM(clips.feature_dim, config.model.hidden_size, batch_first=True)
    targets = torch.from_numpy(training_targets(parts["train"], "partial"))
    data = torch.utils.data.TensorDataset(torch.from_numpy(parts["train"].features), targets)
    loader = torch.utils.data.DataLoader(data, batch_size=64, generator=torch.Generator().manual_seed(seed))
    delta = 1.0 / (10 * len(data))
    engine = PrivacyEngine(accountant="prv")
    private, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3), data_loader=loader,
        target_epsilon=epsilon, target_delta=delta, epochs=epochs, max_grad_norm=1.0)
    start = time.perf_counter()
    for _ in range(epochs):
        private.train()
        for x, y in loader:  # Poisson batches; an empty one (probability ~e^-64 here) still counts as a step
            optimizer.zero_grad()
            label_loss(private(x), y).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    report = evaluate(private._module, parts["test_eval"], "intended")
    return report["macro"]["f1"], engine.get_epsilon(delta), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    config = load_config()
    clips = load_clips(config.data)
    _, parts = split_run(clips, config.data, config.seed)
    print(f"DP-SGD VFER, epsilon {args.epsilon:g}, {args.epochs} epochs, {len(parts['train'])} training clips")
    print(f"{'layer':<12} {'seed':>4} {'macro F1':>9} {'epsilon':>8} {'train s':>8}")
    results: dict[str, list[float]] = {"fast": [], "dplstm": []}
    for seed in range(args.seeds):
        for kind in ("fast", "dplstm"):
            f1, spent, seconds = train(kind, seed, args.epsilon, args.epochs, clips, parts, config)
            results[kind].append(f1)
            print(f"{kind:<12} {seed:>4} {f1:>9.3f} {spent:>8.2f} {seconds:>8.1f}", flush=True)
    for kind, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{kind:<12} mean macro F1 {np.mean(values):.3f} +- {spread:.3f}")
    gap = abs(np.mean(results["fast"]) - np.mean(results["dplstm"]))
    print(f"difference of means {gap:.3f}")


if __name__ == "__main__":
    main()
