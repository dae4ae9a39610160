"""What each label-noise method adds to a round, side by side with the partial-label baseline (issue 27).

    python benchmarks/label_noise.py                       # default data at 40% pair noise, 4 rounds per run
    python benchmarks/label_noise.py --privacy person --rounds 3
    python benchmarks/label_noise.py --separability        # can a model tell the noisy clips? (about 2 minutes)
    python benchmarks/label_noise.py --separability --set data.source=digits
    python benchmarks/label_noise.py --set model.architecture=dual_stream   # every method on the dual-stream model

Each method runs ``--rounds`` training rounds of ``privfer simulate`` on the
same data, split and seed, its refinement on from the first round (AMY's
warmup set to 0, so every round pays for it); the runs alternate between the
methods ``--repeats`` times, so the machine's drift falls on all of them
alike. The methods: the baseline, AMY, clip agreement and the baseline on
the dual-stream model (``model.architecture: dual_stream``, RDFER's network). Printed per method: the median seconds of a round (every client's
refinement and training, the secure sum, the server's step and the
validation score) and its ratio to the baseline's, and for AMY the seconds
its refinements took, summed over a round's clients. ``--privacy none`` is a
run without DP (the distributed line's record-level algorithm with the noise
taken out); ``person`` is person-level distributed DP at epsilon 3.

``--separability`` asks what every label-noise method needs: does a model
trained on the noisy labels believe the corrupted clips' labels less than
the clean clips'? It trains privfer's default VFER centrally without DP
(Adam, lr 3e-4, batch 64, KL loss to the partial labels) on the noisy
training clips and after each epoch prints the AUC with which its belief in
each clip's label (the probability of the label's leading class; lower:
more likely noisy) separates the corrupted clips from the clean ones (0.5:
chance), and the model's accuracy against the acted classes of the
training clips; and, for clip agreement (its default sub-clips), the share of
the training clips it would flag as noisy and the precision and recall of
those flags against the corrupted clips, with no confidence gate and with
the gate at 0.5.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")

METHODS = {
    "partial labels": ["federation.strategy=fedavg"],
    "amy": ["federation.strategy=amy", "federation.strategy_options.warmup=0"],
    "clip agreement": ["federation.strategy=clip_agreement", "federation.strategy_options.warmup=0"],
    "dual stream": ["federation.strategy=fedavg", "model.architecture=dual_stream"],
}
PRIVACY = {"none": ["privacy.epsilon=inf"], "person": ["privacy.epsilon=3", "privacy.unit=person"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--privacy", choices=list(PRIVACY), default="none")
    parser.add_argument("--noise", type=float, default=0.4, help="data.label_noise.rate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--separability", action="store_true", help="the AUC part instead of the round times")
    parser.add_argument("--epochs", type=int, default=6, help="--separability: training epochs")
    parser.add_argument("--set", action="append", default=[], help="a dotted config override (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.separability:
        separability(args)
        return

    from privfer.config import load_config
    from privfer.data import load_clips
    from privfer.fl.simulation import simulate
    from privfer.fl.strategies.amy import AMY

    base = [f"data.label_noise.rate={args.noise}", f"federation.rounds={args.rounds}", "federation.adaptation=false",
            "output.save_model=false", "seed=0", *PRIVACY[args.privacy], *args.set]
    clips = load_clips(load_config(None, base).data)
    refining: list[float] = []
    real_refine = AMY.refine

    def timed_refine(self, *a, **k):
        started = time.perf_counter()
        out = real_refine(self, *a, **k)
        refining.append(time.perf_counter() - started)
        return out

    AMY.refine = timed_refine  # type: ignore[method-assign]
    rounds: dict[str, list[float]] = {name: [] for name in METHODS}
    refinement: list[float] = []
    for _ in range(args.repeats):
        for name, overrides in METHODS.items():
            refining.clear()
            config = load_config(None, [*base, *overrides])
            records = []
            simulate(config, None, clips=clips, on_round=records.append)
            rounds[name].extend(r.seconds for r in records)
            if name == "amy":
                refinement.append(sum(refining) / max(1, len(records)))
    baseline = statistics.median(rounds["partial labels"])
    print(f"{args.privacy} privacy, {args.noise:.0%} label noise, {args.rounds} rounds x {args.repeats} runs each, "
          f"{args.threads} thread(s)")
    print("| method | seconds a round (median) | x baseline |")
    print("|---|---|---|")
    for name, seconds in rounds.items():
        median = statistics.median(seconds)
        print(f"| {name} | {median:.2f} | {median / baseline:.2f} |")
    print(f"amy's refinements: {statistics.median(refinement):.2f} s a round, summed over the round's clients")


def auc(scores, positives) -> float:
    """The probability that a random positive scores above a random negative (ties count a half)."""
    import numpy as np
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    positives = np.asarray(positives, dtype=bool)
    n1, n0 = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def separability(args) -> None:
    import numpy as np

    from privfer.config import load_config
    from privfer.data import load_clips
    from privfer.data.label_noise import NOISY, PAIRS
    from privfer.data.labels import training_targets
    from privfer.data.splits import split_run
    from privfer.models.vfer import VFER

    config = load_config(None, [f"data.label_noise.rate={args.noise}", "data.label_noise.kind=pair", "seed=0",
                                "privacy.epsilon=inf", *args.set])
    _, parts = split_run(load_clips(config.data), config.data, config.seed)
    train = parts["train"]
    votes = training_targets(train, "partial", config.data.partial_label_temperature)
    noisy = train.flags[NOISY]
    acted = np.where(noisy, PAIRS[train.intended], train.intended)
    label = votes.argmax(axis=1)
    x, y = torch.from_numpy(train.features).float(), torch.from_numpy(votes).float()
    torch.manual_seed(0)
    model = VFER.from_config(config.model, train.feature_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    print(f"{config.data.source} data, {noisy.mean():.0%} of {len(train)} training clips corrupted (pair noise); "
          f"their labels' leading class is the acted one for {np.mean(label == acted):.3f} of the clips")
    from privfer.fl.strategies.clip_agreement import NOISY as FLAGGED
    from privfer.fl.strategies.clip_agreement import ClipAgreement, ClipAgreementOptions

    gates = {gate: ClipAgreement(ClipAgreementOptions(confidence=gate, warmup=0)) for gate in (0.0, 0.5)}
    print("| epoch | model's accuracy (acted class) | AUC: belief in the label separates noisy from clean | "
          "clip agreement: flagged / precision / recall | the same, confidence 0.5 |")
    print("|---|---|---|---|---|")
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            loss = torch.nn.functional.kl_div(torch.log_softmax(model(x[batch]), -1), y[batch], reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            p = torch.softmax(model(x), -1).numpy()
        belief = p[np.arange(len(p)), label]
        flags = []
        subclips = gates[0.0].probabilities(model, x)  # the gates differ only in their threshold: one forward
        for strategy in gates.values():
            flagged = strategy.split(model, x, y, subclips)[0] == FLAGGED
            precision = noisy[flagged].mean() if flagged.any() else float("nan")
            flags.append(f"{flagged.mean():.3f} / {precision:.3f} / {flagged[noisy].mean():.3f}")
        print(f"| {epoch + 1} | {np.mean(p.argmax(axis=1) == acted):.3f} | {auc(-belief, noisy):.3f} | "
              f"{' | '.join(flags)} |", flush=True)


if __name__ == "__main__":
    main()
