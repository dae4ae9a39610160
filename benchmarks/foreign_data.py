"""Does a budget buy accuracy on data privfer did not design? privfer's defaults against the best central run, per data set.

    python benchmarks/foreign_data.py                                   # every data set, epsilon 1, 3, 8
    python benchmarks/foreign_data.py --datasets digits,watch --epsilons 3,8
    python benchmarks/foreign_data.py --datasets digits --grid small    # 4 central settings instead of 12
    python benchmarks/foreign_data.py --tune-space "federation.server_lr=0.02,0.05,0.1;model.readout=mean,last"

For each data set, side by side in one run and on one split (run seed 0; the
test actors' evaluation halves; the central runs at the delta privfer's run
used, 1 / (10 x the federation's records)):

* **privfer defaults**: ``privfer simulate --epsilon E`` with nothing else set
  (the real masking protocol, distributed DP, no adaptation phase), and the
  same without a budget (``--epsilon inf``): the "no DP" line must be at least
  what epsilon 8 buys, or it is not the ceiling a study says it is.
* **privfer tuned**: ``privfer tune --epsilon E`` over ``--tune-space`` (default:
  privfer tune's: the default readout both and the mean, at the step the rule gives): every
  candidate trained as a pilot, scored on the validation actors through the secure sum, the
  best trained once more with the budget left; E is the total (docs/privacy-accounting.md,
  "Private hyperparameter selection").
* **central grid**: one trusted curator holding every training clip runs
  Opacus DP-SGD (Poisson batches, Adam, C = 1, PRV accountant, the fast DP
  LSTM with ghost clipping) for each setting of a declared grid — three VFER
  shapes (64 units / mean readout / the linear shortcut, privfer's
  distributed default until stop 42; 128 / last / none, the seed paper's;
  128 / mean / none) x two learning rates (2e-3, 1e-2) x two expected batch shares
  (2% and 10% of the records, 20 epochs) — and the best test score is
  reported. Choosing by the test score and charging nothing for the search
  makes this anchor optimistic on purpose: privfer is held to at least
  0.9x of it with its defaults (issue 26).

Data sets (docs/data.md): ``synthetic`` (the default data, the expression in
every apex frame; 7,442 clips of 91 actors), ``synthetic-order``
(``data.synthetic.order_signal=1``: in the frames' order), ``synthetic-small``
(636 clips of 8 actors, 2 + 2 held out: 318 training clips of 4 persons),
``synthetic-large`` (50,000 clips of 610 actors, 48,033 training clips of
586 persons; its rounds use SecAgg+'s sparse graph under semi-honest
security, because a 586-client complete graph under active security is
beyond this machine: the secure sum is the same integers either way, so the
scores are those of the default security), ``digits`` and ``watch`` (real
data packages ship; watch
holds out 2 + 2 of its 10 subjects). Prints one line per run and the table
docs/performance.md records.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
import warnings

import torch

warnings.filterwarnings("ignore")

DATASETS = {
    "synthetic": [],
    "synthetic-order": ["data.synthetic.order_signal=1"],
    "synthetic-small": ["data.synthetic.actors=8", "data.split.val_actors=2", "data.split.test_actors=2"],
    "synthetic-large": ["data.synthetic.actors=610", "aggregation.security=semi_honest"],
    "digits": ["data.source=digits"],
    "watch": ["data.source=watch", "data.split.val_actors=2", "data.split.test_actors=2"],
}
SHAPES = {  # name -> model overrides
    "64-mean-shortcut": ["model.hidden_size=64", "model.readout=mean", "model.shortcut=true"],
    "128-last": ["model.hidden_size=128", "model.readout=last", "model.shortcut=false"],
    "128-mean": ["model.hidden_size=128", "model.readout=mean", "model.shortcut=false"],
}
GRIDS = {
    "full": {"shapes": list(SHAPES), "lr": [2e-3, 1e-2], "batch_share": [0.02, 0.1]},
    "small": {"shapes": ["64-mean-shortcut", "128-last"], "lr": [5e-3], "batch_share": [0.02, 0.1]},
}
EPOCHS = 20


def central_grid_point(config, parts, epsilon: float, delta: float, lr: float, batch_share: float) -> float:
    """Macro F1 of central Opacus DP-SGD (benchmarks/privacy_utility.py's loop) at (epsilon, delta), run seed 0."""
    from privacy_utility import central  # the same directory: python benchmarks/foreign_data.py puts it on the path

    train = parts["train"]
    f1, spent, _ = central(epsilon, delta, 0, parts, train.feature_dim, config, lr=lr,
                           batch_size=max(8, round(batch_share * len(train))), epochs=EPOCHS)
    if spent > epsilon * 1.01:
        raise RuntimeError(f"central run spent epsilon {spent:.3f} > {epsilon}")
    return f1


def privfer_run(overrides: list[str], epsilon: float, clips) -> tuple[float, float, float]:
    """(macro F1, delta, seconds) of privfer simulate with its defaults at ``epsilon`` (inf: no DP)."""
    from privfer.config import load_config
    from privfer.fl.simulation import simulate

    config = load_config(None, [*overrides, f"privacy.epsilon={epsilon}", "seed=0", "federation.adaptation=false",
                                "output.save_model=false"])
    started = time.perf_counter()
    result = simulate(config, None, clips=clips)
    return result.macro_f1, result.privacy.delta, time.perf_counter() - started


def privfer_tuned(overrides: list[str], epsilon: float, clips, space: dict) -> tuple[float, dict, float]:
    """(macro F1 of the chosen candidate, its settings, seconds) of privfer tune at the total ``epsilon``."""
    import tempfile
    from pathlib import Path

    from privfer.config import load_config
    from privfer.fl.tuning import tune

    config = load_config(None, [*overrides, f"privacy.epsilon={epsilon}", "seed=0", "federation.adaptation=false"])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        result = tune(config, space, Path(folder) / "run", clips=clips)
    return result.test["macro"]["f1"], result.settings, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--grid", default="full", choices=sorted(GRIDS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tune-space", default=None,
                        help="privfer tune's --try items separated by ';' (default: privfer tune's default space)")
    args = parser.parse_args()
    from privfer.fl.tuning import parse_space
    from privfer.privacy.calibrate import PrivacyBudgetError
    from privfer.config import load_config
    from privfer.data import load_clips
    from privfer.data.splits import split_run

    torch.set_num_threads(args.threads)
    grid = GRIDS[args.grid]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    space = parse_space(args.tune_space.split(";") if args.tune_space else None)
    table = []
    for name in args.datasets.split(","):
        overrides = DATASETS[name]
        config = load_config(None, overrides)
        clips = load_clips(config.data)
        _, parts = split_run(clips, config.data, 0)
        train = parts["train"]
        actors = len(set(train.actor_ids.tolist()))
        print(f"# {name}: {len(clips)} clips, {len(train)} training clips of {actors} actors, "
              f"T x D = {clips.frames} x {clips.feature_dim}", flush=True)
        f1_free, _, seconds = privfer_run(overrides, math.inf, clips)
        print(f"{name:>16} privfer  eps inf  F1 {f1_free:.3f}  ({seconds:.0f} s)", flush=True)
        for epsilon in epsilons:
            f1_default, delta, seconds = privfer_run(overrides, epsilon, clips)  # the central runs use its delta
            print(f"{name:>16} privfer  eps {epsilon:g}  delta {delta:.3g}  F1 {f1_default:.3f}  ({seconds:.0f} s)",
                  flush=True)
            try:
                f1_tuned, chosen, seconds = privfer_tuned(overrides, epsilon, clips, space)
            except PrivacyBudgetError as exc:  # the candidates need more noise than the cap allows: say so
                print(f"{name:>16} tuned    eps {epsilon:g}  {exc}", flush=True)
                f1_tuned, chosen, seconds = math.nan, {}, 0.0
            print(f"{name:>16} tuned    eps {epsilon:g}  F1 {f1_tuned:.3f}  chose {chosen}  ({seconds:.0f} s)", flush=True)
            best, best_setting = -1.0, ""
            for shape, lr, share in itertools.product(grid["shapes"], grid["lr"], grid["batch_share"]):
                started = time.perf_counter()
                shaped = load_config(None, [*overrides, *SHAPES[shape], f"privacy.epsilon={epsilon}"])
                f1 = central_grid_point(shaped, parts, epsilon, delta, lr, share)
                print(f"{name:>16} central  eps {epsilon:g}  {shape} lr {lr:g} batch {share:g}  F1 {f1:.3f}  "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
                if f1 > best:
                    best, best_setting = f1, f"{shape}, lr {lr:g}, batch {share:g}"
            table.append((name, epsilon, f1_default, f1_tuned, chosen, best, best_setting, f1_free))
    print("\n| data | epsilon | privfer defaults | privfer tuned (total budget) | central best (grid) | ratio defaults "
          "/ tuned | privfer without DP |")
    print("|---|---|---|---|---|---|---|")
    for name, epsilon, f1_default, f1_tuned, chosen, best, setting, f1_free in table:
        picked = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in chosen.items()) or "unreachable"
        print(f"| {name} | {epsilon:g} | {f1_default:.3f} | {f1_tuned:.3f} ({picked}) | {best:.3f} ({setting}) | "
              f"{f1_default / best:.2f} / {f1_tuned / best:.2f} | {f1_free:.3f} |")


if __name__ == "__main__":
    main()
