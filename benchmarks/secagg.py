"""Secure-aggregation cost, measured side by side in one run (one process, this machine).

    python benchmarks/secagg.py            # the full grid of issue #3 (about 15-25 minutes on 2 cores)
    python benchmarks/secagg.py --quick    # n in {10, 100}, d = 1e5: under a minute

For every (n clients, d values, dropout rate, graph) the whole round runs in
process through privfer.secagg.aggregate; reported are the mean per-client
seconds per stage, the server's seconds, bytes sent and received per client,
the ratio of a client's masking time to producing the same keystream bytes
with the raw AES-256-CTR cipher, and the ratio of the whole round to a
plaintext sum of the same vectors.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from privfer.secagg import SecAggConfig, aggregate
from privfer.secagg import messages as m

STAGE_LABELS = {"advertise_keys": "adv", "share_keys": "share", "masked_input": "mask", "unmask": "unmask"}


def raw_keystream_seconds(streams: int, words: int, repeats: int = 3) -> float:
    """The floor: AES-256-CTR producing ``streams`` keystreams of ``words`` 32-bit words into one buffer."""
    seed = os.urandom(32)
    size = words * 4
    buffer = bytearray(size + 15)
    zeros = bytes(size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(streams):
            Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor().update_into(zeros, buffer)
        best = min(best, time.perf_counter() - start)
    return best


def run_case(n: int, d: int, dropout: float, graph: str, rng: np.random.Generator) -> dict:
    # SecAgg+ sizes its degree for the dropout rate it must survive (at least the default 10%)
    config = SecAggConfig(num_clients=n, graph=graph, clipping_range=1.0, expected_dropout=max(dropout, 0.1))
    updates = {cid: [rng.normal(0, 0.1, d).astype(np.float32)] for cid in range(1, n + 1)}
    dropped = rng.choice(np.arange(1, n + 1), int(round(dropout * n)), replace=False)
    dropouts = {int(c): "masked_input" for c in dropped}  # vanish after sharing keys: the costly case

    plain_seconds = float("inf")
    for _ in range(3):  # best of three: the plaintext sum is short and noisy
        start = time.perf_counter()
        plain = np.sum([u[0] for cid, u in updates.items() if cid not in dropouts], axis=0, dtype=np.float64)
        plain_seconds = min(plain_seconds, time.perf_counter() - start)

    start = time.perf_counter()
    result = aggregate(updates, config, dropouts)
    round_seconds = time.perf_counter() - start
    assert np.max(np.abs(result.total[0] - plain)) <= result.error_bound + 1e-6

    times = result.transcript
    survivors = result.included
    sent = np.mean([times.bytes_in(c) for c in survivors])
    received = np.mean([times.bytes_out(c) for c in survivors])
    # masking floor: a surviving client expands one PRG stream per peer that shared keys, plus its self mask
    sample = survivors[0]
    bundle = next(e.message for e in result.transcript.entries if isinstance(e.message, m.ForwardedShares)
                  and e.message.receiver == sample)
    floor = raw_keystream_seconds(len(bundle.ciphertexts) + 1, d + 1)
    masking = result.times.masking[sample]
    return {
        "n": n, "d": d, "dropout": dropout, "graph": graph, "degree": config.degree,
        **{f"client_{STAGE_LABELS[s]}": result.times.client_mean(s) for s in STAGE_LABELS},
        "server": sum(result.times.server.values()),
        "round": round_seconds,
        "sent_MB": sent / 1e6, "received_MB": received / 1e6,
        "expansion": sent / (d * 4),
        "mask_vs_cipher": masking / floor,
        "round_vs_plain": round_seconds / plain_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small grid (n <= 100, d = 1e5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    grid = []
    for n in (10, 100) if args.quick else (10, 100, 500):
        for d in (100_000,) if args.quick else (100_000, 1_000_000):
            for dropout in (0.0, 0.1, 0.3):
                for graph in ("complete", "harary"):
                    grid.append((n, d, dropout, graph))
    header = (f"{'n':>4} {'d':>8} {'drop':>4} {'graph':>8} {'k':>4} | {'adv':>6} {'share':>6} {'mask':>6} "
              f"{'unmask':>6} | {'server':>7} {'round':>7} | {'sent MB':>8} {'recv MB':>8} {'expand':>6} | "
              f"{'mask/AES':>8} {'round/plain':>11}")
    print(header)
    print("-" * len(header))
    for n, d, dropout, graph in grid:
        if graph == "harary" and n <= 10:
            continue  # 2 log2 n >= n - 1: the same as the complete graph
        row = run_case(n, d, dropout, graph, rng)
        print(
            f"{n:>4} {d:>8.0e} {dropout:>4.1f} {graph:>8} {row['degree']:>4} | {row['client_adv']:>6.3f} "
            f"{row['client_share']:>6.3f} {row['client_mask']:>6.3f} {row['client_unmask']:>6.3f} | "
            f"{row['server']:>7.2f} {row['round']:>7.2f} | {row['sent_MB']:>8.2f} {row['received_MB']:>8.2f} "
            f"{row['expansion']:>6.3f} | {row['mask_vs_cipher']:>8.2f} {row['round_vs_plain']:>11.0f}",
            flush=True,
        )
    print("\nclient columns: mean seconds per client per stage; server: seconds over all stages; round: whole "
          "round in one process (all clients + server); expand: bytes sent / (d x 4 bytes); mask/AES: client "
          "masking time over the raw AES-256-CTR keystream time for the same bytes.", file=sys.stderr)


if __name__ == "__main__":
    main()
