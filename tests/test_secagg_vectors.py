"""privfer's secure aggregation against the known-answer vectors of protocols/secagg/ (SPEC.md)."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from privfer.secagg import SecAggConfig, aggregate, decode, prg, shamir
from privfer.secagg.identity import Enrollment, EnrollmentAuthority, Identity, RosterCertificate
from privfer.secagg.keys import agree, kdf_info
from privfer.secagg.quantize import encode_fixed_point
from privfer.secagg.randomness import InsecureDeterministicRandomness, Randomness

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "protocols" / "secagg" / "vectors.json").read_text())


def test_vectors_are_for_this_protocol_version():
    from privfer.secagg import PROTOCOL_VERSION

    assert VECTORS["protocol"] == "privfer-secagg" and VECTORS["version"] == PROTOCOL_VERSION


@pytest.mark.parametrize("case", VECTORS["prg"], ids=lambda c: c["seed"][:12])
def test_prg(case):
    seed = bytes.fromhex(case["seed"])
    assert [f"{w:08x}" for w in prg.expand(seed, len(case["words32"]), 32).tolist()] == case["words32"]
    assert [f"{w:016x}" for w in prg.expand(seed, len(case["words64"]), 64).tolist()] == case["words64"]


@pytest.mark.parametrize("case", VECTORS["kdf"], ids=lambda c: c["purpose"])
def test_key_derivation(case):
    purpose = case["purpose"].encode()
    assert kdf_info(purpose, case["round_id"], case["u"], case["v"]).hex() == case["info"]
    key = agree(bytes.fromhex(case["u_private"]), bytes.fromhex(case["v_public"]), purpose, case["round_id"],
                case["u"], case["v"])
    assert key.hex() == case["key"]


@pytest.mark.parametrize("case", VECTORS["shamir"])
def test_shamir(case):
    assert shamir.PRIME == case["prime"]
    secret = bytes.fromhex(case["secret"])
    assert shamir.secret_to_chunks(secret).tolist() == case["chunks"]
    coefficients = np.array(case["coefficients"], dtype=np.uint64)[:, None, :]
    shares = shamir.split([secret], case["holders"], case["threshold"], coefficients=coefficients)
    assert {str(h): shamir.share_to_bytes(shares[i, 0]).hex() for i, h in enumerate(case["holders"])} == case["shares"]
    for subset in itertools.combinations(case["holders"], case["threshold"]):
        given = np.stack([shamir.share_from_bytes(bytes.fromhex(case["shares"][str(h)])) for h in subset])[:, None]
        assert shamir.reconstruct(list(subset), given, case["threshold"]) == [secret]


class FixedSeed(Randomness):
    deterministic = True

    def __init__(self, value: bytes) -> None:
        self.value = value

    def bytes(self, n: int) -> bytes:
        assert n == 32
        return self.value


@pytest.mark.parametrize("case", VECTORS["quantization"], ids=lambda c: str(c["modulus_bits"]))
def test_quantization(case):
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        words, report = encode_fixed_point(np.array(case["values"]), case["clipping_range"], case["precision_bits"],
                                           case["modulus_bits"], FixedSeed(bytes.fromhex(case["rounding_seed"])))
    width = case["modulus_bits"] // 4
    assert [f"{w:0{width}x}" for w in words.tolist()] == case["words"]
    assert report.clipped == case["clipped"]


def _active(case: dict) -> dict:
    """The active round's enrollments rebuilt from the vector's seeds; the certificate's bytes must match."""
    if "certificate" not in case:
        return {}
    raw = bytes.fromhex(case["certificate"])
    authority = Identity.from_seed(bytes.fromhex(case["authority_seed"]))
    certificate = RosterCertificate.load(raw, authority.public, "kat-study",
                                         now=RosterCertificate.parse(raw).not_before)
    identities = {int(c): Identity.from_seed(bytes.fromhex(h)) for c, h in case["identity_seeds"].items()}
    assert all(certificate.members[c] == i.public for c, i in identities.items())
    rebuilt = EnrollmentAuthority(authority).certify("kat-study", {c: i.public for c, i in identities.items()},
                                                     valid_seconds=certificate.not_after - certificate.not_before,
                                                     not_before=certificate.not_before)
    assert rebuilt.to_bytes() == raw  # Ed25519 signatures are deterministic
    return {"enrollments": {c: Enrollment(c, i, certificate) for c, i in identities.items()},
            "context": bytes.fromhex(case["context"])}


@pytest.mark.parametrize("name", ["round", "group_round", "active_round"])
def test_complete_rounds(name):
    """A 3-client complete-graph round, a 7-client SecAgg+ ring with group rosters (kinds 8 and 9), and a 4-client
    round under active security (signed adverts and rosters, the consistency check: kinds 10 and 11)."""
    case = VECTORS[name]
    settings = {k: v for k, v in case["config"].items()}
    settings["metrics"] = tuple(settings["metrics"])
    config = SecAggConfig(**settings)
    updates = {int(c): [np.array(a, dtype=np.float64) for a in arrays] for c, arrays in case["updates"].items()}
    result = aggregate(
        updates, config, {int(c): s for c, s in case["dropouts"].items()}, **_active(case),
        example_counts={int(c): v for c, v in case["example_counts"].items()},
        metrics={int(c): v for c, v in case["metrics"].items()},
        round_id=case["round_id"],
        randomness=lambda cid: InsecureDeterministicRandomness(bytes.fromhex(case["client_randomness"][str(cid)])),
    )
    produced = [e.message.to_bytes().hex() for e in result.transcript.entries]
    expected = [m["bytes"] for m in case["messages"]]
    for index, (mine, theirs) in enumerate(zip(produced, expected)):
        assert mine == theirs, f"message {index} ({case['messages'][index]['kind']}) differs"
    assert len(produced) == len(expected)
    for m in case["messages"]:  # every vector message decodes as the kind it claims
        assert type(decode(bytes.fromhex(m["bytes"]))).__name__ == m["kind"]
    assert [f"{w:08x}" for w in result.words.tolist()] == case["sum_words"]
    assert result.included == case["included"]
    assert [a.tolist() for a in result.total] == case["total"]
    assert result.example_count == case["example_count"] == sum(
        v for c, v in case["example_counts"].items() if int(c) in case["included"])
    assert result.metrics == case["metric_sums"]
