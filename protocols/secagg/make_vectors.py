"""Regenerate the known-answer vectors of SPEC.md: python protocols/secagg/make_vectors.py

Every value is derived from fixed inputs (fixed seeds, keys, coefficients,
rounding randomness), so another implementation can reproduce each one.
The test suite (tests/test_secagg_vectors.py) checks privfer against
vectors.json; regenerate only when the protocol version changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from privfer.secagg import PROTOCOL_VERSION, SecAggConfig, aggregate, prg, shamir
from privfer.secagg.identity import Enrollment, EnrollmentAuthority, Identity
from privfer.secagg.keys import PURPOSE_MASK, PURPOSE_SHARE, KeyPairs, agree, kdf_info
from privfer.secagg.quantize import encode_fixed_point
from privfer.secagg.randomness import InsecureDeterministicRandomness
from privfer.secagg.statements import context_digest

HERE = Path(__file__).resolve().parent


def seed(label: str) -> bytes:
    """A fixed 32-byte value named by ``label`` (zero-padded ASCII)."""
    return label.encode().ljust(32, b"\0")


def prg_vectors() -> list[dict]:
    out = []
    for label, count in (("prg-seed-1", 8), ("prg-seed-2", 8)):
        s = seed(label)
        out.append({
            "seed": s.hex(),
            "words32": [f"{w:08x}" for w in prg.expand(s, count, 32).tolist()],
            "words64": [f"{w:016x}" for w in prg.expand(s, count // 2, 64).tolist()],
        })
    return out


def kdf_vectors() -> list[dict]:
    out = []
    a = KeyPairs.generate(InsecureDeterministicRandomness(seed("kdf-client-a")))
    b = KeyPairs.generate(InsecureDeterministicRandomness(seed("kdf-client-b")))
    for purpose, a_priv, b_pub in ((PURPOSE_MASK, a.s_private, b.s_public), (PURPOSE_SHARE, a.c_private, b.c_public)):
        from privfer.secagg.keys import private_bytes

        out.append({
            "purpose": purpose.decode(),
            "round_id": "kat-round",
            "u": 7, "v": 3,
            "u_private": private_bytes(a_priv).hex(),
            "v_public": b_pub.hex(),
            "info": kdf_info(purpose, "kat-round", 7, 3).hex(),
            "key": agree(a_priv, b_pub, purpose, "kat-round", 7, 3).hex(),
        })
    return out


def shamir_vectors() -> list[dict]:
    secret = seed("shamir-secret")
    holders = [1, 2, 5, 9, 12]
    threshold = 3
    coefficients = (np.arange(1, (threshold - 1) * shamir.CHUNKS + 1, dtype=np.uint64) * 123456789) % shamir.PRIME
    coefficients = coefficients.reshape(threshold - 1, 1, shamir.CHUNKS)
    shares = shamir.split([secret], holders, threshold, coefficients=coefficients)
    return [{
        "prime": shamir.PRIME,
        "secret": secret.hex(),
        "chunks": [int(c) for c in shamir.secret_to_chunks(secret)],
        "threshold": threshold,
        "holders": holders,
        "coefficients": coefficients[:, 0, :].astype(int).tolist(),
        "shares": {str(h): shamir.share_to_bytes(shares[i, 0]).hex() for i, h in enumerate(holders)},
    }]


def quantization_vectors() -> list[dict]:
    out = []
    values = [0.0, 0.3, -0.3, 1.25, -7.5, 9.0]
    for bits, precision in ((32, 16), (64, 40)):
        rounding_seed = seed(f"rounding-{bits}")
        words, report = encode_fixed_point(np.array(values), 8.0, precision, bits,
                                           _FixedBytes(rounding_seed))
        width = bits // 4
        out.append({
            "values": values, "clipping_range": 8.0, "precision_bits": precision, "modulus_bits": bits,
            "rounding_seed": rounding_seed.hex(),
            "words": [f"{w:0{width}x}" for w in words.tolist()],
            "clipped": report.clipped,
        })
    return out


class _FixedBytes(InsecureDeterministicRandomness):
    """Hands out exactly one given 32-byte value (the rounding seed)."""

    def __init__(self, value: bytes) -> None:
        self.value = value

    def bytes(self, n: int) -> bytes:
        assert n == 32
        return self.value


def full_round() -> dict:
    config = SecAggConfig(num_clients=3, modulus_bits=32, clipping_range=4.0, precision_bits=16,
                          metrics=("loss",), metric_range=10.0)
    updates = {1: [np.array([0.5, -1.0]), np.array([[0.25]])],
               2: [np.array([1.5, 2.0]), np.array([[-0.75]])],
               3: [np.array([-0.25, 0.125]), np.array([[1.0]])]}
    counts = {1: 10, 2: 20, 3: 30}
    metrics = {1: {"loss": 0.5}, 2: {"loss": 1.0}, 3: {"loss": 2.0}}
    return _round(config, updates, counts, metrics, {3: "masked_input"}, "kat-round-3")


def group_round() -> dict:
    """Seven clients on a degree-4 SecAgg+ ring with group rosters (kinds 8 and 9); client 3 never advertises
    keys (the roster's ids are two runs) and client 5 drops before its masked input (the survivors three)."""
    config = SecAggConfig(num_clients=7, modulus_bits=32, clipping_range=4.0, precision_bits=16, graph="harary",
                          neighbours=4, roster="group", metrics=("loss",), metric_range=10.0)
    updates = {c: [np.array([0.25 * c, -0.5 * c]), np.array([[0.125 * (c % 3)]])] for c in range(1, 8)}
    counts = {c: 10 * c for c in range(1, 8)}
    metrics = {c: {"loss": 0.25 * c} for c in range(1, 8)}
    return _round(config, updates, counts, metrics, {3: "advertise_keys", 5: "masked_input"}, "kat-group-round-7")


CERT_START = 1_700_000_000  # the active round's certificate: valid from this unix time for twenty years


def active_enrollments(members: list[int]) -> dict[int, Enrollment]:
    """Deterministic identities (Ed25519 keys from fixed seeds; signatures are deterministic) and certificate."""
    authority = EnrollmentAuthority(Identity.from_seed(seed("authority")))
    identities = {c: Identity.from_seed(seed(f"identity-{c}")) for c in members}
    certificate = authority.certify("kat-study", {c: i.public for c, i in identities.items()},
                                    valid_seconds=20 * 365 * 86400, not_before=CERT_START)
    return {c: Enrollment(c, identities[c], certificate) for c in members}


def active_round() -> dict:
    """Five enrolled clients, active security (section 6.4's consistency check, kinds 10 and 11): client 5 drops
    before its masked input, client 2 after signing but before unmasking (its input is included); four sign (the
    threshold: floor((5 + 1 colluder) / 2) + 1)."""
    config = SecAggConfig(num_clients=5, modulus_bits=32, clipping_range=4.0, precision_bits=16,
                          metrics=("loss",), metric_range=10.0, security="active")
    updates = {c: [np.array([0.5 * c, -0.25 * c]), np.array([[0.125 * c]])] for c in range(1, 6)}
    counts = {c: 5 * c for c in range(1, 6)}
    metrics = {c: {"loss": 0.5 * c} for c in range(1, 6)}
    enrollments = active_enrollments(list(updates))
    context = context_digest(b"kat-model", b"kat-plan")
    case = _round(config, updates, counts, metrics, {5: "masked_input", 2: "unmask"}, "kat-active-round-5",
                  enrollments=enrollments, context=context)
    return {**case, "authority_seed": seed("authority").hex(),
            "identity_seeds": {str(c): seed(f"identity-{c}").hex() for c in updates},
            "certificate": enrollments[1].certificate.to_bytes().hex(), "context": context.hex()}


def _round(config: SecAggConfig, updates: dict, counts: dict, metrics: dict, dropouts: dict, round_id: str,
           **active: object) -> dict:
    result = aggregate(updates, config, dropouts, example_counts=counts, metrics=metrics,
                       round_id=round_id,
                       randomness=lambda cid: InsecureDeterministicRandomness(seed(f"client-{cid}")), **active)
    return {
        "config": {k: v for k, v in config.model_dump().items() if v is not None} | {"metrics": ["loss"]},
        "round_id": round_id,
        "client_randomness": {str(c): seed(f"client-{c}").hex() for c in updates},
        "updates": {str(c): [a.tolist() for a in u] for c, u in updates.items()},
        "example_counts": {str(c): v for c, v in counts.items()},
        "metrics": {str(c): v for c, v in metrics.items()},
        "dropouts": {str(c): stage for c, stage in dropouts.items()},
        "messages": [
            {"stage": e.stage, "direction": e.direction, "party": e.party, "kind": type(e.message).__name__,
             "bytes": e.message.to_bytes().hex()}
            for e in result.transcript.entries
        ],
        "sum_words": [f"{w:08x}" for w in result.words.tolist()],
        "included": result.included,
        "total": [a.tolist() for a in result.total],
        "example_count": result.example_count,
        "metric_sums": result.metrics,
    }


def main() -> None:
    vectors = {
        "protocol": "privfer-secagg",
        "version": PROTOCOL_VERSION,
        "prg": prg_vectors(),
        "kdf": kdf_vectors(),
        "shamir": shamir_vectors(),
        "quantization": quantization_vectors(),
        "round": full_round(),
        "group_round": group_round(),
        "active_round": active_round(),
    }
    (HERE / "vectors.json").write_text(json.dumps(vectors, indent=1) + "\n")
    print(f"wrote {HERE / 'vectors.json'}")


if __name__ == "__main__":
    main()
