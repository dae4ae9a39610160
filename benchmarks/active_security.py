"""What active security costs, semi-honest and active rounds side by side in one run (one process, this machine).

    python benchmarks/active_security.py              # n = 67, d = 83,000 (the default simulate's round) + n = 1,000
    python benchmarks/active_security.py --quick      # n = 67 only, one repeat

Each case runs whole rounds through ``privfer.secagg.aggregate`` (every message through its byte encoding),
alternating the two modes so that drift on the machine hits both alike, 10% of the clients dropping after
sharing keys (the costly case). Reported: the median round seconds of each mode and their ratio, and the mean
bytes a surviving client sends and receives. Active rounds get their enrollments (member keys and the signed
certificate) made beforehand, as a deployment's members hold them; the in-process enrollment of the round's
clients, which ``privfer simulate`` does per round, is timed separately.

The person-level population case (n = 1,000, d = 5,000) compares what each mode can use: semi-honest on the
sparse SecAgg+ graph with group rosters (O(log n) per client) and active on the complete graph with the full
roster (O(n) per client) — sparse graphs are refused under active security (protocols/secagg/SPEC.md, section 1).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from privfer.secagg import SecAggConfig, aggregate
from privfer.secagg.identity import enroll_in_process


def one_round(config: SecAggConfig, updates: dict, dropouts: dict, enrollments) -> tuple[float, float, float]:
    start = time.perf_counter()
    result = aggregate(updates, config, dropouts, enrollments=enrollments)
    seconds = time.perf_counter() - start
    survivors = result.included
    sent = float(np.mean([result.transcript.bytes_in(c) for c in survivors]))
    received = float(np.mean([result.transcript.bytes_out(c) for c in survivors]))
    return seconds, sent, received


def compare(n: int, d: int, repeats: int, settings: dict[str, dict]) -> list[dict]:
    rng = np.random.default_rng(0)
    updates = {c: [rng.normal(0, 0.1, d).astype(np.float32)] for c in range(1, n + 1)}
    dropped = rng.choice(np.arange(1, n + 1), max(1, n // 10), replace=False)
    dropouts = {int(c): "masked_input" for c in dropped}
    configs = {mode: SecAggConfig(num_clients=n, clipping_range=1.0, **fields) for mode, fields in settings.items()}
    start = time.perf_counter()
    enrollments = enroll_in_process(range(1, n + 1))
    enroll_seconds = time.perf_counter() - start
    runs: dict[str, list] = {mode: [] for mode in settings}
    for _ in range(repeats):  # interleaved: both modes see the same machine
        for mode, config in configs.items():
            fresh = {c: type(e)(c, e.identity, e.certificate) for c, e in enrollments.items()}  # a new round id each
            runs[mode].append(one_round(config, updates, dropouts,
                                        fresh if config.security == "active" else None))
    rows = []
    for mode, results in runs.items():
        rows.append({"n": n, "d": d, "mode": mode, "graph": configs[mode].graph,
                     "roster": configs[mode].roster, "seconds": statistics.median(r[0] for r in results),
                     "sent_KB": results[0][1] / 1e3, "received_KB": results[0][2] / 1e3})
    base = rows[0]["seconds"]
    for row in rows:
        row["ratio"] = row["seconds"] / base
    rows[-1]["enroll_seconds"] = enroll_seconds
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    rows = compare(67, 83_000, repeats, {"semi_honest": {"graph": "complete"},
                                          "active": {"graph": "complete", "security": "active"}})
    if not args.quick:
        rows += compare(1000, 5_000, 1, {"semi_honest (harary, group)": {"graph": "harary", "roster": "group"},
                                         "active (complete, full)": {"graph": "complete", "security": "active"}})
    print(f"{'n':>6} {'d':>7}  {'mode':<28} {'seconds':>8} {'ratio':>6} {'sent KB':>9} {'recv KB':>9}")
    for row in rows:
        extra = f"  (in-process enrollment of {row['n']}: {row['enroll_seconds']:.2f} s)" if "enroll_seconds" in row \
            else ""
        print(f"{row['n']:>6} {row['d']:>7}  {row['mode']:<28} {row['seconds']:>8.2f} {row['ratio']:>6.2f} "
              f"{row['sent_KB']:>9.1f} {row['received_KB']:>9.1f}{extra}")


if __name__ == "__main__":
    main()
