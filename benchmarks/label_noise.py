"""What each label-noise method adds to a round, side by side with the partial-label baseline (issue 27).

    python benchmarks/label_noise.py                       # default data at 40% pair noise, 4 rounds per run
    python benchmarks/label_noise.py --privacy person --rounds 3

Each method runs ``--rounds`` training rounds of ``privfer simulate`` on the
same data, split and seed, its refinement on from the first round (AMY's
warmup set to 0, so every round pays for it); the runs alternate between the
methods ``--repeats`` times, so the machine's drift falls on all of them
alike. Printed per method: the median seconds of a round (every client's
refinement and training, the secure sum, the server's step and the
validation score) and its ratio to the baseline's, and for AMY the seconds
its refinements took, summed over a round's clients. ``--privacy none`` is a
run without DP (the distributed line's record-level algorithm with the noise
taken out); ``person`` is person-level distributed DP at epsilon 3.
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
}
PRIVACY = {"none": ["privacy.epsilon=inf"], "person": ["privacy.epsilon=3", "privacy.unit=person"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--privacy", choices=list(PRIVACY), default="none")
    parser.add_argument("--noise", type=float, default=0.4, help="data.label_noise.rate")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from privfer.config import load_config
    from privfer.data import load_clips
    from privfer.fl.simulation import simulate
    from privfer.fl.strategies.amy import AMY

    base = [f"data.label_noise.rate={args.noise}", f"federation.rounds={args.rounds}", "federation.adaptation=false",
            "output.save_model=false", "seed=0", *PRIVACY[args.privacy]]
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


if __name__ == "__main__":
    main()
