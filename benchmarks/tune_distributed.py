"""Tune distributed DP-SGD's defaults on the VALIDATION actors (never the test actors).

    python benchmarks/tune_distributed.py --hidden 64 --readout mean --steps 40,60 --lr 0.01,0.02
    python benchmarks/tune_distributed.py --epsilon 8 --steps 40 --lr 0.02 --threads 2
    python benchmarks/tune_distributed.py --epsilon 1 --lr 0.02,0.03 --clip 1.0,0.3 --seeds 0,1
    python benchmarks/tune_distributed.py --epsilon 1 --steps 20,40 --lr 0.03 --shortcut 0,1 --seeds 0,1
    python benchmarks/tune_distributed.py --set data.source=digits --hidden 128 --readout last --shortcut 0
    python benchmarks/tune_distributed.py --input-norm unit --set data.source=watch --set data.split.val_actors=2 \
        --set data.split.test_actors=2 --lr 0.02,0.05,0.1,0.2 --seeds 0,1

What one round of ``privfer simulate --epsilon E`` computes, without the
protocol's cost: every training clip's clipped gradient summed (the same
:func:`privfer.models.clipped_sums.clipped_gradient_sums`), plus noise of the
variance the released sum carries (the calibrated Skellam variance mu times
67/55, the share of a full round over the honest minimum), then one step of
the server's Adam. The noise is drawn as a Gaussian of that variance: at the
default integer scale (2^16 units per unit of gradient, standard deviation
above 10^5 units) the Skellam and the Gaussian are indistinguishable for
optimisation. Prints the validation macro F1 at four points of the run, per
seed (``seed=S``: the actor split and the initialisation) and the mean over
seeds, for every combination of steps, learning rate, clip norm and the VFER's
linear shortcut (``--shortcut``, on by default as under distributed DP)
(``privacy.max_grad_norm=C``, which the noise calibration and the clipped sums
both use).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--steps", default="40")
    parser.add_argument("--lr", default="0.02")
    parser.add_argument("--clip", default="1.0", help="comma-separated privacy.max_grad_norm values")
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds (the split depends on the seed)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--readout", default="mean", choices=("last", "mean", "both"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--input-norm", default="none", choices=("none", "unit", "rms"),
                        help="unit: divide each clip by its own root mean square times sqrt(D), so a frame's features "
                             "have norm about 1 whatever the data; rms: by its root mean square only (features of "
                             "size about 1); both per-record maps, free under DP")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config override for the data, e.g. --set data.source=digits (repeatable)")
    parser.add_argument("--shortcut", default="1", help="comma-separated: 1 with the VFER's linear shortcut, 0 without")
    parser.add_argument("--ema", type=float, default=0.0,
                        help="also report an exponential moving average of the iterates with this decay (post-processing)")
    args = parser.parse_args()
    from privfer.data.labels import training_targets
    from privfer.evaluation import evaluate
    from privfer.config import load_config
    from privfer.data import load_clips
    from privfer.data.splits import split_run
    from privfer.fl.simulation import prepare_federation
    from privfer.models.vfer import VFER
    from privfer.models.clipped_sums import clipped_gradient_sums

    torch.set_num_threads(args.threads)
    base = [f"privacy.epsilon={args.epsilon}", f"model.hidden_size={args.hidden}",
            f"model.readout={args.readout}", "federation.adaptation=false", *args.set]
    seeds = [int(s) for s in args.seeds.split(",")]
    clips = load_clips(load_config(None, base).data)
    data = {}  # per seed: the split's parts and the training tensors
    for seed in seeds:
        config = load_config(None, [*base, f"seed={seed}"])
        _, parts = split_run(clips, config.data, config.seed)
        if args.input_norm != "none":
            parts = {name: _rescaled(part, per_frame=args.input_norm == "unit") for name, part in parts.items()}
        train = parts["train"]
        x = torch.from_numpy(train.features)
        y = torch.from_numpy(training_targets(train, "partial"))
        data[seed] = parts, x, y
    grid = itertools.product([int(s) for s in args.steps.split(",")], [float(v) for v in args.lr.split(",")],
                             [float(c) for c in args.clip.split(",")],
                             [bool(int(v)) for v in args.shortcut.split(",")])
    for steps, lr, clip, shortcut in grid:
        label = (f"epsilon {args.epsilon:g} hidden {args.hidden} {args.readout} shortcut {int(shortcut)} steps {steps} "
                 f"lr {lr:g} clip {clip:g}")
        curves, ema_curves = [], []
        for seed in seeds:
            overrides = [*base, f"seed={seed}", f"privacy.max_grad_norm={clip}", f"federation.rounds={steps}"]
            config = load_config(None, overrides)
            parts, x, y = data[seed]
            groups = torch.zeros(len(x), dtype=torch.long)
            plan = prepare_federation(config, clips).plans["training"]
            # the released sum's noise, in gradient units: a full round carries clients / honest x mu
            std = math.sqrt(plan.mu * plan.clients / plan.honest) / plan.scale
            torch.manual_seed(config.seed)
            model = VFER(clips.feature_dim, args.hidden, readout=args.readout, fast_dp=True, shortcut=shortcut)
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
            started, curve, ema_curve = time.perf_counter(), [], []
            averaged = copy.deepcopy(model) if args.ema else None
            for step in range(steps):
                sums = clipped_gradient_sums(model, x, y, groups, 1, config.privacy.max_grad_norm).sums
                for name, parameter in model.named_parameters():
                    noisy = sums[name][0] + torch.randn_like(sums[name][0]) * std
                    parameter.grad = (noisy / len(x)).float()
                optimizer.step()
                if averaged is not None:
                    with torch.no_grad():
                        for mine, theirs in zip(averaged.parameters(), model.parameters()):
                            mine.mul_(args.ema).add_(theirs, alpha=1 - args.ema)
                if (step + 1) % max(steps // 4, 1) == 0:
                    curve.append(round(evaluate(model, parts["val"], "intended")["macro"]["f1"], 3))
                    if averaged is not None:
                        ema_curve.append(round(evaluate(averaged, parts["val"], "intended")["macro"]["f1"], 3))
            curves.append(curve)
            print(f"{label} seed {seed} noise multiplier {plan.noise_multiplier:.2f} (std {std:.3g}): "
                  f"validation macro F1 {curve}" + (f" ema {args.ema:g} {ema_curve}" if averaged else "")
                  + f" ({time.perf_counter() - started:.0f} s)", flush=True)
            if averaged is not None:
                ema_curves.append(ema_curve)
        mean = [round(sum(c[i] for c in curves) / len(curves), 3) for i in range(min(map(len, curves)))]
        print(f"{label} mean over seeds {seeds}: validation macro F1 {mean}", flush=True)
        if ema_curves:
            mean = [round(sum(c[i] for c in ema_curves) / len(ema_curves), 3) for i in range(min(map(len, ema_curves)))]
            print(f"{label} ema {args.ema:g} mean over seeds {seeds}: validation macro F1 {mean}", flush=True)

def _rescaled(clips, per_frame: bool):
    """The clips, each divided by its own root mean square (and sqrt(D) with ``per_frame``: frames of norm
    about 1)."""
    import dataclasses

    import numpy as np

    rms = np.sqrt((clips.features.astype(np.float64) ** 2).mean(axis=(1, 2), keepdims=True))
    scaled = clips.features / np.maximum(rms, 1e-12) / (np.sqrt(clips.feature_dim) if per_frame else 1.0)
    return dataclasses.replace(clips, features=scaled.astype(np.float32))


if __name__ == "__main__":
    main()
