"""CKKS aggregation cost: privfer's roles against raw TenSEAL calls, side by side in one run.

    python benchmarks/he.py            # d in {1e5, 1e6} x n in {10, 100} (about 10 minutes on 2 cores)
    python benchmarks/he.py --quick    # d = 1e5, n = 10

For each (d values, n clients): mean per-client encryption seconds, the
server's summing seconds, the key authority's decryption seconds and bytes
sent per client, through privfer.secagg.he; then the same vectors through bare
TenSEAL calls (ckks_vector, serialize, deserialize, +=, decrypt) in the same
process; their ratio (the wrapper's overhead) and the ciphertext expansion
over float32.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tenseal as ts

from privfer.secagg.identity import enroll_in_process
from privfer.secagg.he import HEClient, HELayout, HEServer, KeyAuthority, make_ckks_config


def privfer_round(updates: dict[int, list[np.ndarray]], n: int) -> dict:
    config = make_ckks_config(num_clients=n, min_clients=2, clipping_range=1.0)
    layout = HELayout.for_arrays(updates[1], config)
    enrolled = enroll_in_process(list(updates))
    authority = KeyAuthority(config, enrolled[min(updates)].certificate)
    public = authority.public_context()
    server = HEServer(public, layout, "bench", config)
    encrypt = add = load = 0.0
    sizes = []
    for cid, update in updates.items():
        start = time.perf_counter()
        client = HEClient(cid, public, layout, "bench", enrolled[cid], authority.sealing_key)  # loads the context once
        load += time.perf_counter() - start
        start = time.perf_counter()
        message = client.encrypt(update).to_bytes()
        encrypt += time.perf_counter() - start
        sizes.append(len(message))
        start = time.perf_counter()
        server.receive(message)
        add += time.perf_counter() - start
    start = time.perf_counter()
    aggregate = server.bundle().to_bytes()
    add += time.perf_counter() - start
    start = time.perf_counter()
    plain = authority.decrypt(aggregate, layout, "bench")
    decrypt = time.perf_counter() - start
    return {"encrypt": encrypt / n, "sum": add, "decrypt": decrypt, "bytes": float(np.mean(sizes)),
            "load": load / n, "context_bytes": len(public), "total": plain.arrays[0]}


def raw_round(updates: dict[int, list[np.ndarray]], slots: int) -> dict:
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    context.global_scale = 2.0**40
    public = context.copy()
    public.make_context_public()
    encrypt = add = 0.0
    total = None
    for update in updates.values():
        flat = np.concatenate([a.ravel() for a in update])
        start = time.perf_counter()
        blobs = [ts.ckks_vector(public, flat[i : i + slots].tolist()).serialize() for i in range(0, flat.size, slots)]
        encrypt += time.perf_counter() - start
        start = time.perf_counter()
        vectors = [ts.ckks_vector_from(public, b) for b in blobs]
        if total is None:
            total = vectors
        else:
            for t, v in zip(total, vectors):
                t += v
        add += time.perf_counter() - start
    start = time.perf_counter()
    blobs = [t.serialize() for t in total]
    add += time.perf_counter() - start
    start = time.perf_counter()
    values = np.concatenate([ts.ckks_vector_from(context, b).decrypt() for b in blobs])
    decrypt = time.perf_counter() - start
    return {"encrypt": encrypt / len(updates), "sum": add, "decrypt": decrypt, "total": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    grid = [(100_000, 10)] if args.quick else [(d, n) for d in (100_000, 1_000_000) for n in (10, 100)]
    header = (f"{'d':>8} {'n':>4} | {'enc/client s':>12} {'sum s':>7} {'decrypt s':>9} {'MB/client':>9} "
              f"{'x float32':>9} | {'raw enc':>8} {'raw sum':>8} {'raw dec':>8} | {'privfer/raw':>11} | "
              f"{'ctx load s':>10}")
    print(header)
    print("-" * len(header))
    for d, n in grid:
        updates = {cid: [rng.uniform(-1, 1, d).astype(np.float32)] for cid in range(1, n + 1)}
        ours = privfer_round(updates, n)
        raw = raw_round(updates, 4096)
        exact = np.sum([u[0] for u in updates.values()], axis=0, dtype=np.float64)
        assert np.max(np.abs(ours["total"] - exact)) < 1e-4 and np.max(np.abs(raw["total"][:d] - exact)) < 1e-4
        ours_total = ours["encrypt"] * n + ours["sum"] + ours["decrypt"]
        raw_total = raw["encrypt"] * n + raw["sum"] + raw["decrypt"]
        print(f"{d:>8.0e} {n:>4} | {ours['encrypt']:>12.3f} {ours['sum']:>7.2f} {ours['decrypt']:>9.3f} "
              f"{ours['bytes'] / 1e6:>9.2f} {ours['bytes'] / (4 * d):>9.1f} | {raw['encrypt']:>8.3f} "
              f"{raw['sum']:>8.2f} {raw['decrypt']:>8.3f} | {ours_total / raw_total:>11.3f} | "
              f"{ours['load']:>10.3f}", flush=True)
    print("\nctx load s: a client's one-time cost of loading the public context "
          f"({ours['context_bytes'] / 1e6:.1f} MB), outside the per-round ratio.")


if __name__ == "__main__":
    main()
