"""DP-SGD step cost of recurrent layers, measured side by side in one run.

    python benchmarks/dp_lstm.py            # batch {32, 64} x frames {16, 32}, D = 256, hidden 128
    python benchmarks/dp_lstm.py --quick    # batch 32, frames 16

One training step = forward, backward, optimizer step (Adam) of an LSTM over
(batch, frames, 256) features with a linear head on the last hidden state.
Compared: a non-private ``nn.LSTM`` (oneDNN's fused LSTM on this CPU); privfer's
``FastDPLSTM`` without DP (what its Python-level recurrence costs before any
privacy work); Opacus's ``DPLSTM`` (hooks); privfer's
``FastDPLSTM`` with Opacus per-sample gradients (hooks) and with Opacus ghost
clipping (per-sample norms only). Each configuration runs in a fresh
subprocess so its peak resident memory is its own; the step time is the
median of 20 steps after 5 warm-up steps. Ratios are against ``nn.LSTM``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

WORKER = r"""
import json, resource, statistics, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
from torch import nn
from opacus import PrivacyEngine
from opacus.layers import DPLSTM
from privfer.models.dp_lstm import FastDPLSTM

kind, batch, frames = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
features, hidden = 256, 128
torch.manual_seed(0)

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = {"lstm": lambda: nn.LSTM(features, hidden, batch_first=True),
                    "dplstm": lambda: DPLSTM(features, hidden, batch_first=True)}.get(
            kind, lambda: FastDPLSTM(features, hidden))()
        self.head = nn.Linear(hidden, 6)
    def forward(self, x):
        states, _ = self.rnn(x)
        return self.head(states[:, -1])

x, y = torch.randn(batch, frames, features), torch.randint(0, 6, (batch,))
model = Model()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
criterion = nn.CrossEntropyLoss()
if kind not in ("lstm", "fast_plain"):
    data = torch.utils.data.TensorDataset(torch.randn(4 * batch, frames, features), torch.randint(0, 6, (4 * batch,)))
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    mode = "ghost" if kind == "fast_ghost" else "hooks"
    extra = {"criterion": criterion} if mode == "ghost" else {}
    made = PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                                        max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode, **extra)
    model, optimizer = made[0], made[1]
    if mode == "ghost":
        criterion = made[2]
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def step():
    optimizer.zero_grad()
    criterion(model(x), y).backward()
    optimizer.step()
for _ in range(5):
    step()
times = []
for _ in range(20):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"ms": 1000 * statistics.median(times), "peak_mb": peak / 1024, "step_mb": (peak - baseline) / 1024}))
"""

KINDS = [("lstm", "nn.LSTM (non-private)"), ("fast_plain", "FastDPLSTM (non-private)"),
         ("dplstm", "Opacus DPLSTM (hooks)"), ("fast", "FastDPLSTM (hooks)"), ("fast_ghost", "FastDPLSTM (ghost)")]


def measure(kind: str, batch: int, frames: int) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, kind, str(batch), str(frames)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    grid = [(32, 16)] if args.quick else [(32, 16), (32, 32), (64, 16), (64, 32)]
    print(f"{'batch':>5} {'T':>3} | {'layer':<24} {'ms/step':>8} {'x nn.LSTM':>9} {'peak MB':>8}")
    print("-" * 66)
    for batch, frames in grid:
        base = None
        for kind, label in KINDS:
            row = measure(kind, batch, frames)
            base = base or row["ms"]
            print(f"{batch:>5} {frames:>3} | {label:<24} {row['ms']:>8.1f} {row['ms'] / base:>9.2f} "
                  f"{row['peak_mb']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
