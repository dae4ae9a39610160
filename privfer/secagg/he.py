"""Homomorphic-encryption aggregation (CKKS via TenSEAL) with a key authority the server is not.

Roles (protocols/he/SPEC.md):

* :class:`KeyAuthority` creates the CKKS context and keeps the only secret key.
  It hands out the *public* context (encryption, addition; no decryption) and
  decrypts an aggregate only when it covers at least ``min_clients`` distinct
  clients — which it verifies from an encrypted client-count coordinate.
* :class:`HEClient` encrypts its update, example count and metrics with the
  public context, seals the ciphertexts to the key authority and signs them.
* :class:`HEServer` holds the public context only: it relays the sealed, signed
  updates to the key authority. It cannot decrypt or compute on anything.

Privacy holds unless the server colludes with the key authority — unlike the
common deployment in which every client holds the same secret key, where any
one client colluding with the server reads every update. Version 2: every
client is an enrolled member (a roster certificate from an enrollment authority
that is not the server) and signs its encrypted update for the round; the key
authority verifies every signature, sums the signed updates itself and decrypts
one such sum per round, of at least ``min_clients`` distinct members. A server
that adds its own encryptions (pads) to a victim's ciphertext, duplicates one,
or replays one in another round is refused (protocols/he/SPEC.md, section 1).
"""

from __future__ import annotations

import math
import secrets
import struct
import time
from dataclasses import dataclass
from typing import ClassVar, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from privfer.errors import ConfigError
from privfer.secagg.errors import (DuplicateSender, MalformedMessage, MessageError, OutOfRangeSum, RoundAborted,
                                   UnknownSender)
from privfer.secagg.identity import SIGNATURE_BYTES, Enrollment, RosterCertificate, enroll_in_process, verify_signature
from privfer.secagg.errors import UnsupportedVersion, WrongRound, WrongVectorLength
from privfer.secagg.payload import ArrayLayout
from privfer.secagg.quantize import ClippingReport, ClippingWarning, clip_and_report
from privfer.secagg.rounds import STAGES, AggregationResult, StageTimes, agreed_shapes, check_round_arguments, warn_clipping

HE_PROTOCOL_VERSION = 2  # 2: signed updates; the key authority sums them itself
DIGIT = 1 << 10  # the clipped-value count travels as three base-1024 digits, each summed exactly
COUNT_DIGITS = 3
HE_MAGIC = b"PFHE"
# SEAL's largest total coefficient-modulus bits for 128-bit security (HomomorphicEncryption.org standard).
MAX_MODULUS_BITS = {8192: 218, 16384: 438}
MAX_CIPHERTEXT_BYTES = 1 << 27
MIN_GRID_BITS = 8


class InvalidCiphertext(MessageError):
    """Bytes that do not parse as a CKKS ciphertext (or context) of this round's parameters."""


class CKKSConfig(BaseModel):
    """CKKS parameters and the aggregation policy, checked when the config is made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["ckks"] = "ckks"
    num_clients: int = Field(..., ge=2, le=1_000_000, description="Most clients in one aggregate.")
    min_clients: int = Field(
        2, ge=2, description="The key authority decrypts only aggregates of at least this many (one would release a "
        "client's update in the clear)."
    )
    grid_bits: int | None = Field(
        None, ge=MIN_GRID_BITS, le=30,
        description="Clients' values are stochastically rounded to multiples of 2^-grid_bits; the key authority "
        "rounds each decryption to that grid, so what it releases carries no CKKS noise. None: the finest grid "
        "whose half-step is at least twice the decryption error bound.",
    )
    poly_modulus_degree: Literal[8192, 16384] = Field(8192, description="Ring degree N; N / 2 slots per ciphertext.")
    coeff_mod_bit_sizes: tuple[int, ...] = Field((60, 40, 40, 60), description="Bit sizes of the coefficient moduli.")
    scale_bits: int = Field(40, ge=20, le=60, description="log2 of the CKKS scale.")
    clipping_range: float = Field(8.0, gt=0, description="Update values are clipped to [-c, c] (and counted).")
    max_examples: int = Field(
        4096, ge=1, description="Largest example count a client may report (sums must fit the plaintext headroom)."
    )
    metrics: tuple[str, ...] = Field((), description="Names of per-client metrics summed under encryption.")
    metric_range: float = Field(1e3, gt=0, description="Metric values are clipped to [-m, m].")

    @model_validator(mode="after")
    def _check(self) -> "CKKSConfig":
        moduli = self.coeff_mod_bit_sizes
        limit = MAX_MODULUS_BITS[self.poly_modulus_degree]
        if len(moduli) < 2 or any(not 20 <= b <= 60 for b in moduli):
            raise ValueError("coeff_mod_bit_sizes needs at least two moduli of 20..60 bits each")
        if sum(moduli) > limit:
            raise ValueError(
                f"coeff_mod_bit_sizes sum to {sum(moduli)} bits; poly_modulus_degree {self.poly_modulus_degree} "
                f"allows at most {limit} for 128-bit security"
            )
        if any(b < self.scale_bits for b in moduli[1:-1]):
            raise ValueError(
                f"scale_bits {self.scale_bits} exceeds an intermediate modulus of {min(moduli[1:-1])} bits; "
                "the scale must fit every rescaling modulus"
            )
        headroom = moduli[0] - self.scale_bits  # bits left for the integer part of a plaintext
        largest = self.num_clients * max(self.clipping_range, self.max_examples, self.metric_range, DIGIT - 1)
        if largest >= 2 ** (headroom - 1):
            raise ValueError(
                f"a sum of {self.num_clients} clients can reach {largest:.4g}, but the first modulus "
                f"({moduli[0]} bits) minus scale_bits ({self.scale_bits}) leaves {headroom} bits: values must stay "
                f"below 2^{headroom - 1} = {2 ** (headroom - 1)}; raise the first modulus or lower scale_bits"
            )
        if self.error_bound(self.num_clients) >= 0.25:
            raise ValueError(
                f"scale_bits {self.scale_bits} is too coarse for {self.num_clients} clients: the error bound "
                f"{self.error_bound(self.num_clients):.3g} would blur the exact counts; raise scale_bits"
            )
        finest = self.finest_grid_bits()
        if finest < MIN_GRID_BITS:
            raise ValueError(
                f"scale_bits {self.scale_bits} leaves a release grid of 2^-{finest} for {self.num_clients} clients "
                f"(the grid's half-step must be twice the decryption error bound); at least 2^-{MIN_GRID_BITS} "
                "is needed: raise scale_bits"
            )
        if self.grid_bits is not None and self.grid_bits > finest:
            raise ValueError(f"grid_bits {self.grid_bits} is finer than the decryption error allows for "
                             f"{self.num_clients} clients (at most {finest})")
        largest = self.num_clients * max(self.clipping_range, self.max_examples, self.metric_range, DIGIT - 1)
        if largest * 2.0 ** self.grid >= 2.0**53:
            raise ValueError(f"sums up to {largest:.4g} on a grid of 2^-{self.grid} exceed float64's exact integers")
        if self.min_clients > self.num_clients:
            raise ValueError(f"min_clients {self.min_clients} exceeds num_clients {self.num_clients}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("metric names must be distinct")
        return self

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def error_bound(self, clients: int) -> float:
        """Stated bound on |decrypted sum - float sum| per coordinate.

        Encoding and fresh encryption add noise of several thousand units at
        scale 2^s: measured worst cases per value and client are about 2^(12.5 - s)
        at N = 8192 and 2^(13.8 - s) at N = 16384. Sums add the clients' noise.
        We state clients x 2^(16 - s), at least 4x the worst measured error
        (tests/test_secagg_he.py checks it over random shapes and client counts).
        """
        return clients * 2.0 ** (16 - self.scale_bits)

    def finest_grid_bits(self) -> int:
        """The largest g with error_bound(num_clients) <= 2^-(g + 2): the decryption error stays below half of
        half a grid step, so rounding to the grid recovers the exact sum of the clients' grid values."""
        return min(30, math.floor(-math.log2(self.error_bound(self.num_clients))) - 2)

    @property
    def grid(self) -> int:
        """grid_bits, resolved."""
        return self.grid_bits if self.grid_bits is not None else self.finest_grid_bits()

    def release_error_bound(self, clients: int) -> float:
        """|released sum - float sum| per coordinate: the clients' stochastic rounding to the grid only."""
        return clients * 2.0 ** -self.grid


def make_ckks_config(**settings: object) -> CKKSConfig:
    """Build a :class:`CKKSConfig`, turning validation failures into :class:`ConfigError`."""
    from pydantic import ValidationError

    try:
        return CKKSConfig(**settings)
    except ValidationError as exc:
        parts = [f"{'.'.join(map(str, e['loc'])) or 'ckks'}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        raise ConfigError("invalid CKKS config: " + "; ".join(parts)) from None


def _tenseal():
    import tenseal

    return tenseal


def _load_context(raw: bytes):
    try:
        return _tenseal().context_from(raw)
    except Exception:  # TenSEAL raises ValueError or RuntimeError on bad bytes
        raise InvalidCiphertext("bytes do not parse as a TenSEAL context") from None


# -- packing -------------------------------------------------------------------------


@dataclass(frozen=True)
class HELayout(ArrayLayout):
    """[update | example count | 1 (client count) | clipped count in 3 base-1024 digits | metrics], chunked by slots."""

    config: CKKSConfig

    @property
    def length(self) -> int:
        return self.update_length + 2 + COUNT_DIGITS + len(self.config.metrics)

    @property
    def chunks(self) -> int:
        return max(1, math.ceil(self.length / self.config.slots))

    def pack(self, arrays: Sequence[np.ndarray], example_count: int, metrics: Mapping[str, float] | None
             ) -> tuple[list[np.ndarray], ClippingReport]:
        config = self.config
        flat, metrics = self.flatten(arrays, example_count, metrics)
        flat, report = clip_and_report(flat.astype(np.float64, copy=False), config.clipping_range)
        metric_values, metric_report = clip_and_report(
            np.array([float(metrics.get(name, 0.0)) for name in config.metrics]), config.metric_range
        )
        report.add(metric_report)
        flat, metric_values = to_grid(flat, config.grid), to_grid(metric_values, config.grid)
        digits = [(report.clipped // DIGIT**i) % DIGIT for i in range(COUNT_DIGITS)]
        vector = np.concatenate([flat, np.array([float(example_count), 1.0, *digits]), metric_values])
        slots = config.slots
        return [vector[i : i + slots] for i in range(0, vector.size, slots)], report

    def check_sum(self, vector: np.ndarray, clients: int) -> None:
        """Refuse (:class:`OutOfRangeSum`) a decrypted sum that ``clients`` in-range inputs cannot produce: each
        update value within clients x (c + 2^-g) (clipping, then rounding up to the grid), the example count in
        0..clients x max_examples, each clipped-count digit in 0..clients x 1023, each metric within
        clients x (m + 2^-g). A client can encrypt anything; the key authority releases nothing beyond this."""
        config, n = self.config, self.update_length
        step = 2.0 ** -config.grid
        ranges = [(vector[:n], config.clipping_range + step, "update value"),
                  (vector[n + 2 + COUNT_DIGITS : self.length], config.metric_range + step, "metric")]
        for values, bound, what in ranges:
            outside = np.flatnonzero(np.abs(values) > clients * bound)
            if outside.size:
                raise OutOfRangeSum(f"the decrypted sum's {what} {int(outside[0])} is beyond what {clients} clients "
                                    "with in-range inputs can produce; nothing is released")
        digits = vector[n + 2 : n + 2 + COUNT_DIGITS]
        if not 0 <= vector[n] <= clients * config.max_examples or np.any(digits < 0) \
                or np.any(digits > clients * (DIGIT - 1)):
            raise OutOfRangeSum(f"the decrypted sum's example or clipping count is beyond what {clients} clients can "
                                "report; nothing is released")

    def unpack(self, vector: np.ndarray) -> tuple[list[np.ndarray], float, float, int, dict[str, float]]:
        n = self.update_length
        digits = np.rint(vector[n + 2 : n + 2 + COUNT_DIGITS]).astype(np.int64)
        clipped = int(sum(int(d) * DIGIT**i for i, d in enumerate(digits)))
        metrics = dict(zip(self.config.metrics, vector[n + 2 + COUNT_DIGITS : self.length].tolist()))
        return self.unflatten(vector[:n]), float(vector[n]), float(vector[n + 1]), clipped, metrics


def to_grid(values: np.ndarray, bits: int) -> np.ndarray:
    """Unbiased stochastic rounding to multiples of 2^-bits (uniforms from the OS CSPRNG)."""
    if values.size == 0:
        return values
    uniforms = np.frombuffer(secrets.token_bytes(8 * values.size), dtype=np.uint64) / 2.0**64
    scale = 2.0**bits
    return np.floor(values * scale + uniforms) / scale


# -- messages ----------------------------------------------------------------------------


_SEAL_INFO = b"privfer-he/v2/seal"
_SEAL_HEADER = 32 + 12  # ephemeral X25519 public key, AES-GCM nonce


def _seal_key(shared: bytes, round_id: str, sender: int) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    encoded = round_id.encode("utf-8")
    info = _SEAL_INFO + bytes([len(encoded)]) + encoded + struct.pack(">I", sender)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _pack_chunks(chunks: Sequence[bytes]) -> bytes:
    return struct.pack(">I", len(chunks)) + b"".join(struct.pack(">I", len(c)) + c for c in chunks)


def _unpack_chunks(raw: bytes, limit: int) -> tuple[bytes, ...]:
    from privfer.secagg.reader import ByteReader

    reader = ByteReader(raw, InvalidCiphertext, "sealed update")
    count = reader.u32()
    if count > limit:
        raise InvalidCiphertext(f"a sealed update of {count} chunks; the round has {limit}")
    chunks = []
    for _ in range(count):
        size = reader.u32()
        if size > MAX_CIPHERTEXT_BYTES:
            raise InvalidCiphertext(f"a chunk of {size} bytes exceeds {MAX_CIPHERTEXT_BYTES}")
        chunks.append(reader.take(size))
    reader.end()
    return tuple(chunks)


def seal_update(authority_key: bytes, round_id: str, sender: int, chunks: Sequence[bytes]) -> bytes:
    """A client's CKKS chunks encrypted to the key authority (X25519 with a fresh key, HKDF-SHA256 bound to the
    round and sender, AES-256-GCM): the server relays bytes it cannot compute on. Without it a colluding client
    could sign Enc(pad) - ct_honest — the server relays ct_honest to it — and cancel an honest input, so that
    the key authority's sum of "three signed updates" is one victim's (SPEC section 1)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from privfer.secagg.keys import public_bytes

    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(authority_key))
    nonce = secrets.token_bytes(12)
    aad = _SEAL_INFO + round_id.encode("utf-8") + struct.pack(">I", sender)
    sealed = AESGCM(_seal_key(shared, round_id, sender)).encrypt(nonce, _pack_chunks(chunks), aad)
    return public_bytes(ephemeral.public_key()) + nonce + sealed


def update_statement(study: str, round_id: str, sender: int, ciphertexts: Sequence[bytes]) -> bytes:
    """What a client signs: its encrypted update for one round of one study (SPEC section 3)."""
    import hashlib

    digest = hashlib.sha256()
    for blob in ciphertexts:
        digest.update(struct.pack(">I", len(blob)) + blob)
    study_bytes, round_bytes = study.encode("utf-8"), round_id.encode("utf-8")
    return (b"privfer-he/v2/update" + bytes([len(study_bytes)]) + study_bytes + bytes([len(round_bytes)])
            + round_bytes + struct.pack(">I", sender) + digest.digest())


class HEMessage(BaseModel):
    """An encrypted, signed update (client -> server) or the bundle of them (server -> key authority)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    KINDS: ClassVar[dict[str, int]] = {"update": 1, "bundle": 3}

    kind: Literal["update", "bundle"]
    round_id: str = Field(..., min_length=1, max_length=255)
    sender: int = Field(..., ge=0, le=(1 << 31) - 2)
    included: tuple[int, ...] = ()  # bundle only: the clients whose updates it carries
    ciphertexts: tuple[bytes, ...] = ()  # update only
    signature: bytes = b""  # update only: the sender's Ed25519 signature on update_statement(...)
    updates: tuple[bytes, ...] = ()  # bundle only: each included client's update message, as it was sent
    version: int = HE_PROTOCOL_VERSION

    def to_bytes(self) -> bytes:
        encoded = self.round_id.encode("utf-8")
        parts = [HE_MAGIC, bytes([self.version, self.KINDS[self.kind], len(encoded)]), encoded,
                 struct.pack(">II", self.sender, len(self.included))]
        parts.extend(struct.pack(">I", c) for c in self.included)
        parts.append(struct.pack(">I", len(self.ciphertexts)))
        for blob in self.ciphertexts:
            parts.append(struct.pack(">I", len(blob)) + blob)
        parts.append(bytes([len(self.signature)]) + self.signature)
        parts.append(struct.pack(">I", len(self.updates)))
        for blob in self.updates:
            parts.append(struct.pack(">Q", len(blob)) + blob)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "HEMessage":
        view = memoryview(bytes(raw))
        at = 0

        def take(n: int) -> bytes:
            nonlocal at
            if n < 0 or at + n > len(view):
                raise MalformedMessage(f"HE message truncated at offset {at}")
            chunk = view[at : at + n].tobytes()
            at += n
            return chunk

        if take(4) != HE_MAGIC:
            raise MalformedMessage("not a privfer HE message (bad magic)")
        version, kind = take(1)[0], take(1)[0]
        if version != HE_PROTOCOL_VERSION:
            raise UnsupportedVersion(f"HE protocol version {version} is not supported")
        names = {v: k for k, v in cls.KINDS.items()}
        if kind not in names:
            raise MalformedMessage(f"unknown HE message kind {kind}")
        try:
            round_id = take(take(1)[0]).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedMessage("round id is not UTF-8") from None
        sender, count = struct.unpack(">II", take(8))
        if count > 1_000_000:
            raise MalformedMessage("too many included clients")
        included = tuple(struct.unpack(">I", take(4))[0] for _ in range(count))
        if len(set(included)) != len(included):
            raise DuplicateSender("the aggregate lists a client twice")
        blobs = []
        (chunks,) = struct.unpack(">I", take(4))
        if chunks > 1 << 20:
            raise MalformedMessage("too many ciphertext chunks")
        for _ in range(chunks):
            (size,) = struct.unpack(">I", take(4))
            blobs.append(take(size))  # bounded by the bytes present; a sealed update's chunks are checked inside
        signature = take(take(1)[0])
        if len(signature) not in (0, SIGNATURE_BYTES):
            raise MalformedMessage(f"an update's signature is {SIGNATURE_BYTES} bytes")
        (count_updates,) = struct.unpack(">I", take(4))
        if count_updates > 1_000_000:
            raise MalformedMessage("too many updates in the bundle")
        updates = []
        for _ in range(count_updates):
            (size,) = struct.unpack(">Q", take(8))
            updates.append(take(size))  # take() refuses sizes beyond the bytes present
        if at != len(view):
            raise MalformedMessage("trailing bytes after the HE message")
        try:
            return cls(kind=names[kind], round_id=round_id, sender=sender, included=included, ciphertexts=tuple(blobs),
                       signature=signature, updates=tuple(updates))
        except Exception as exc:
            raise MalformedMessage(f"invalid HE message: {exc.__class__.__name__}") from None


# -- roles ---------------------------------------------------------------------------------


def _varint(raw: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= len(raw) or shift > 63:
            raise InvalidCiphertext("a CKKS vector's framing is truncated")
        byte = raw[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def check_vector_framing(raw: bytes, who: str) -> None:
    """Refuse, before TenSEAL loads it, a serialized CKKSVector that holds anything but ONE ciphertext (TenSEAL's
    CKKSVectorProto: sizes = 1, ciphertexts = 2, scale = 3). A vector may carry any number of compressed
    ciphertexts, each tiny on the wire and megabytes once loaded: one enrolled client could otherwise exhaust
    the key authority's memory with a small update (hostile review 4). One SEAL ciphertext is bounded (at most
    16 polynomials)."""
    at, ciphertexts = 0, 0
    while at < len(raw):
        tag, at = _varint(raw, at)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, at = _varint(raw, at)
        elif wire == 1:
            at += 8
        elif wire == 2:
            length, at = _varint(raw, at)
            at += length
            ciphertexts += field == 2
        elif wire == 5:
            at += 4
        else:
            raise InvalidCiphertext(f"{who} sent a CKKS vector with an unknown field encoding")
        if at > len(raw):
            raise InvalidCiphertext(f"{who} sent a truncated CKKS vector")
        if field not in (1, 2, 3):
            raise InvalidCiphertext(f"{who} sent a CKKS vector with an unknown field {field}")
    if ciphertexts != 1:
        raise InvalidCiphertext(f"{who} sent a CKKS vector carrying {ciphertexts} ciphertexts, not one")


def parse_chunks(context, blobs: Sequence[bytes], layout: "HELayout", who: str) -> list:
    """CKKS vectors from bytes, each checked for the agreed number of values (InvalidCiphertext otherwise)."""
    ts = _tenseal()
    if len(blobs) != layout.chunks:
        raise WrongVectorLength(f"{who}: {len(blobs)} ciphertext chunks, expected {layout.chunks}")
    slots = layout.config.slots
    vectors = []
    for index, blob in enumerate(blobs):
        check_vector_framing(blob, who)
        try:
            vector = ts.ckks_vector_from(context, blob)
        except Exception:  # TenSEAL raises ValueError or RuntimeError on bad bytes
            raise InvalidCiphertext(f"{who} sent bytes that are not a CKKS vector") from None
        expected = min(slots, layout.length - index * slots)
        if vector.size() != expected:
            raise InvalidCiphertext(f"{who}: chunk {index} holds {vector.size()} values, expected {expected}")
        vectors.append(vector)
    return vectors


def add_into(total: list, chunks: list) -> bool:
    """Add one client's chunks to ``total`` in place; if a chunk does not add (another scale, say), take back the
    ones already added and return False: nothing of that client stays in the sum."""
    added = []
    try:
        for chunk_sum, vector in zip(total, chunks):
            chunk_sum += vector
            added.append((chunk_sum, vector))
    except (ValueError, RuntimeError):
        for chunk_sum, vector in added:
            chunk_sum -= vector
        return False
    return True


def add_updates(vectors: list[list], who: Sequence[int]) -> list:
    """The chunk-wise sum of several clients' CKKS vectors, or InvalidCiphertext naming the client whose chunks
    do not add. The key authority sums the opened updates this way; anyone holding them computes the same sum."""
    total = [vector.copy() for vector in vectors[0]]
    for sender, chunks in zip(who[1:], vectors[1:]):
        if not add_into(total, chunks):
            raise InvalidCiphertext(f"client {sender}'s ciphertexts do not add to the others'")
    return total


class KeyAuthority:
    """Creates the CKKS keys, keeps the secret key, and decrypts one verified sum per round.

    ``certificate``: the study's roster certificate (checked by the caller against its pinned authority key): the
    key authority decrypts only sums of updates it verified — each signed by an enrolled member for this round,
    distinct members, at least ``min_clients`` — and sums them itself, so a server cannot add ciphertexts of its
    own (pads), duplicate one, or bring one from another round."""

    def __init__(self, config: CKKSConfig, certificate: RosterCertificate) -> None:
        if not isinstance(certificate, RosterCertificate):
            raise TypeError("the key authority needs the study's RosterCertificate to verify signed updates")
        ts = _tenseal()
        self.config = config
        self.certificate = certificate
        self._context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=config.poly_modulus_degree,
            coeff_mod_bit_sizes=list(config.coeff_mod_bit_sizes),
        )
        self._context.global_scale = 2.0**config.scale_bits
        public = self._context.copy()
        public.make_context_public()  # drops the secret key
        self._public = public.serialize(save_secret_key=False)
        self._released: set[str] = set()  # rounds whose decryption was attempted: one attempt per round id
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self._seal = X25519PrivateKey.generate()  # clients seal their updates to it (OS CSPRNG)
        self.rejected: set[int] = set()  # the last decryption's senders whose sealed update was bad

    @property
    def sealing_key(self) -> bytes:
        """The X25519 public key clients seal their updates to. Clients must get it from the key authority, not
        through the server (which could substitute its own and open every update)."""
        from privfer.secagg.keys import public_bytes

        return public_bytes(self._seal.public_key())

    def _unseal(self, update: HEMessage, layout: "HELayout") -> tuple[bytes, ...]:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(update.ciphertexts) != 1 or len(update.ciphertexts[0]) < _SEAL_HEADER + 16:
            raise InvalidCiphertext(f"client {update.sender}'s update is not one sealed blob")
        blob = update.ciphertexts[0]
        try:
            shared = self._seal.exchange(X25519PublicKey.from_public_bytes(blob[:32]))
            aad = _SEAL_INFO + update.round_id.encode("utf-8") + struct.pack(">I", update.sender)
            plain = AESGCM(_seal_key(shared, update.round_id, update.sender)).decrypt(
                blob[32:_SEAL_HEADER], blob[_SEAL_HEADER:], aad)
        except (InvalidTag, ValueError):
            raise InvalidCiphertext(f"client {update.sender}'s sealed update does not open") from None
        return _unpack_chunks(plain, layout.chunks)

    def public_context(self) -> bytes:
        """The context clients and the server get: public key only."""
        return self._public

    def signed_senders(self, bundle: HEMessage, round_id: str) -> list[int]:
        """Every update of the bundle, checked without decrypting anything: this round, distinct enrolled senders,
        a valid signature each. Any failure refuses the whole bundle (an honest server forwards only verified
        updates) and, deciding nothing about the plaintexts, leaves the round id open."""
        senders: list[int] = []
        if len(bundle.updates) > self.config.num_clients:
            raise RoundAborted(f"the bundle carries {len(bundle.updates)} updates; the round is for at most "
                               f"{self.config.num_clients} (the decryption error bound is sized for them)")
        for raw in bundle.updates:
            update = HEMessage.from_bytes(raw)
            if update.kind != "update":
                raise MalformedMessage("a bundle carries client updates only")
            if update.round_id != round_id:
                raise WrongRound(f"an update of round {update.round_id!r} in the bundle of round {round_id!r}")
            if update.sender in senders:
                raise DuplicateSender(f"the bundle carries client {update.sender}'s update twice")
            verify_signature(self.certificate.public_key(update.sender),
                             update_statement(self.certificate.study, round_id, update.sender, update.ciphertexts),
                             update.signature, f"client {update.sender}'s encrypted update")
            senders.append(update.sender)
        if tuple(sorted(senders)) != tuple(sorted(bundle.included)):
            raise MalformedMessage("the bundle's list of included clients is not the senders of its updates")
        return senders

    def opened_updates(self, bundle: HEMessage, senders: list[int], layout: "HELayout") -> tuple[list[int], list]:
        """Each signed update opened, parsed and added to the sum: one whose content is bad (the server could not
        see it) — not sealed to this authority, not CKKS, other chunks, another scale — is left out whole
        (``rejected``) and the others are summed."""
        total: list | None = None
        kept: list[int] = []
        for raw, sender in zip(bundle.updates, senders):
            try:
                chunks = parse_chunks(self._context, self._unseal(HEMessage.from_bytes(raw), layout), layout,
                                      f"client {sender}")
            except MessageError:
                self.rejected.add(sender)
                continue
            if total is None:
                total = chunks
            elif not add_into(total, chunks):
                self.rejected.add(sender)
                continue
            kept.append(sender)
        return kept, total or []

    def decrypt(self, message: HEMessage | bytes, layout: HELayout, round_id: str) -> "HEPlainSum":
        message = HEMessage.from_bytes(message) if isinstance(message, (bytes, bytearray)) else message
        if message.kind != "bundle":
            raise MalformedMessage("the key authority decrypts bundles of signed updates only")
        if message.round_id != round_id:
            raise WrongRound(f"bundle of round {message.round_id!r} in round {round_id!r}")
        if len(message.updates) < self.config.min_clients:
            raise RoundAborted(
                f"the bundle carries {len(message.updates)} updates; the key authority decrypts only sums of at "
                f"least {self.config.min_clients} enrolled clients"
            )
        if round_id in self._released:
            raise RoundAborted(
                f"round {round_id!r} was already decrypted (or its decryption refused); a second aggregate of the "
                "same round could be subtracted from the first, and repeated refusals would tell the noise"
            )
        signed = self.signed_senders(message, round_id)
        self._released.add(round_id)  # from here on plaintexts decide: one attempt per round id, whatever it gives
        self.rejected = set()
        senders, summed = self.opened_updates(message, signed, layout)
        if len(senders) < self.config.min_clients:
            raise RoundAborted(f"{len(senders)} updates opened; the key authority decrypts only sums of at least "
                               f"{self.config.min_clients}")
        values = [np.asarray(vector.decrypt(), dtype=np.float64) for vector in summed]
        noisy = np.concatenate(values)[: layout.length]
        # Release only the grid point: every client's values are on the grid, so their sum is, and the
        # decryption error (below a quarter step by the config's check) is rounded away. What leaves the key
        # authority is then a function of the true sum alone — not the (ciphertext, decryption) pairs of Li and
        # Micciancio's key-recovery attack.
        scale = 2.0**self.config.grid
        grid_points = np.rint(noisy * scale)
        error = float(np.max(np.abs(noisy * scale - grid_points))) / scale if noisy.size else 0.0
        flat = grid_points / scale
        arrays, count, clients, clipped, metrics = layout.unpack(flat)
        try:
            layout.check_sum(flat, len(senders))
            refused = error > self.config.error_bound(len(senders)) or round(clients) != len(senders)
        except OutOfRangeSum:
            refused = True
        if refused:
            # One refusal for every reason a decrypted sum is withheld (a decryption error beyond the bound, a false
            # client count, values out of range), and no number in it: which check failed, or by how much, would
            # be an oracle on the CKKS noise for whoever crafted the inputs (hostile review 4).
            raise OutOfRangeSum("the decrypted sum is refused: the decryption error, the encrypted client count or "
                                "a value is out of its bounds; nothing is released")
        return HEPlainSum(arrays, tuple(sorted(senders)), int(round(count)), clipped, metrics)


@dataclass
class HEPlainSum:
    arrays: list[np.ndarray]
    included: tuple[int, ...]
    example_count: int
    clipped: int
    metrics: dict[str, float]


class HEClient:
    """Encrypts one client's update with the public context (it cannot decrypt), seals it to the key authority
    and signs it as its member. ``sealing_key``: :attr:`KeyAuthority.sealing_key`, from the key authority (a
    trusted channel), never from the server."""

    def __init__(self, client_id: int, public_context: bytes, layout: HELayout, round_id: str,
                 enrollment: Enrollment, sealing_key: bytes) -> None:
        if not isinstance(enrollment, Enrollment) or enrollment.member != client_id:
            raise ValueError(f"client {client_id} needs its enrollment (member {client_id}'s identity and the "
                             "roster certificate) to sign its update")
        if not isinstance(sealing_key, (bytes, bytearray)) or len(sealing_key) != 32:
            raise ValueError("the key authority's sealing key is a 32-byte X25519 public key")
        self.client_id = client_id
        self.enrollment = enrollment
        self.sealing_key = bytes(sealing_key)
        self.context = _load_context(public_context)
        if self.context.has_secret_key():
            raise ValueError("clients must be given the public context, not the secret key")
        self.layout = layout
        self.round_id = round_id
        self.clipping = ClippingReport()

    def encrypt(self, update: Sequence[np.ndarray], example_count: int = 1,
                metrics: Mapping[str, float] | None = None) -> HEMessage:
        ts = _tenseal()
        chunks, self.clipping = self.layout.pack(update, example_count, metrics)
        blobs = [ts.ckks_vector(self.context, chunk.tolist()).serialize() for chunk in chunks]
        sealed = (seal_update(self.sealing_key, self.round_id, self.client_id, blobs),)
        signature = self.enrollment.identity.sign(
            update_statement(self.enrollment.study, self.round_id, self.client_id, sealed))
        return HEMessage(kind="update", round_id=self.round_id, sender=self.client_id, ciphertexts=sealed,
                         signature=signature)


class HEServer:
    """Checks signed, sealed updates and forwards them, as sent, to the key authority, which opens, verifies and
    sums them itself: the server never holds a ciphertext it could compute on, and its sum would be its word."""

    def __init__(self, public_context: bytes, layout: HELayout, round_id: str, config: CKKSConfig,
                 certificate: RosterCertificate | None = None) -> None:
        self.context = _load_context(public_context)
        if self.context.has_secret_key():
            raise ValueError("the server must be given the public context, not the secret key")
        self.layout = layout
        self.round_id = round_id
        self.config = config
        self.certificate = certificate
        self._updates: dict[int, bytes] = {}
        self.bytes_in: dict[int, int] = {}

    def receive(self, raw: bytes | HEMessage) -> None:
        message = HEMessage.from_bytes(raw) if isinstance(raw, (bytes, bytearray)) else raw
        raw = message.to_bytes()
        if message.kind != "update":
            raise MalformedMessage("the server accepts encrypted updates only")
        if message.round_id != self.round_id:
            raise WrongRound(f"update of round {message.round_id!r} in round {self.round_id!r}")
        if message.sender in self._updates:
            raise DuplicateSender(f"client {message.sender} sent two updates")
        if not 1 <= message.sender:
            raise UnknownSender("updates come from clients (ids >= 1)")
        if len(self._updates) >= self.config.num_clients:
            raise UnknownSender(f"more than num_clients={self.config.num_clients} updates")
        limit = _SEAL_HEADER + 16 + 4 + self.layout.chunks * (4 + MAX_CIPHERTEXT_BYTES)
        if len(message.ciphertexts) != 1 or len(message.ciphertexts[0]) > limit:
            raise WrongVectorLength(f"client {message.sender}'s update is not one sealed blob of at most the "
                                    f"round's {self.layout.chunks} chunks")
        if self.certificate is not None:  # an honest server refuses what the key authority would
            verify_signature(self.certificate.public_key(message.sender),
                             update_statement(self.certificate.study, self.round_id, message.sender,
                                              message.ciphertexts),
                             message.signature, f"client {message.sender}'s encrypted update")
        self._updates[message.sender] = raw
        self.bytes_in[message.sender] = len(raw)

    def bundle(self) -> HEMessage:
        """Every received update, as sent, for the key authority."""
        if not self._updates:
            raise RoundAborted("no encrypted update arrived")
        included = tuple(sorted(self._updates))
        return HEMessage(kind="bundle", round_id=self.round_id, sender=0, included=included,
                         updates=tuple(self._updates[c] for c in included))


# -- the recipe -------------------------------------------------------------------------------


def aggregate(
    updates: Mapping[int, Sequence[np.ndarray]],
    config: CKKSConfig,
    dropouts: Mapping[int, str] | None = None,
    *,
    example_counts: Mapping[int, int] | None = None,
    metrics: Mapping[int, Mapping[str, float]] | None = None,
    round_id: str | None = None,
    enrollments: Mapping[int, Enrollment] | None = None,
):
    """The CKKS counterpart of :func:`privfer.secagg.aggregate` (same arguments and result); ``enrollments`` as
    there (default: an in-process enrollment authority).

    A client dropped at any stage up to and including "masked_input" never sends
    its ciphertext and is absent from the sum; a client dropped at "unmask" had
    already sent it (CKKS has no later stage), so it is included.
    """
    import warnings

    dropouts = check_round_arguments(updates, config.num_clients, dropouts, example_counts, metrics)
    round_id = round_id or secrets.token_hex(8)
    layout = HELayout(tuple(agreed_shapes(updates, dropouts)), config)
    if enrollments is None:  # an in-process enrollment authority, not the server, enrolls the round's clients
        enrollments = enroll_in_process(sorted(updates))
    missing = sorted(set(updates) - set(enrollments))
    if missing:
        from privfer.secagg.errors import InvalidRoundArguments

        raise InvalidRoundArguments(f"enrollments has no identity for clients {missing[:5]}")
    certificate = enrollments[min(updates)].certificate
    times = StageTimes()
    start = time.perf_counter()
    authority = KeyAuthority(config, certificate)
    public = authority.public_context()
    server = HEServer(public, layout, round_id, config, certificate)
    times.server["advertise_keys"] += time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClippingWarning)
        for cid in sorted(updates):
            if cid in dropouts and STAGES.index(dropouts[cid]) <= STAGES.index("masked_input"):
                continue
            with times.client("masked_input", cid):
                client = HEClient(cid, public, layout, round_id, enrollments[cid], authority.sealing_key)
                message = client.encrypt(
                    updates[cid],
                    1 if example_counts is None else example_counts[cid],
                    None if metrics is None else metrics.get(cid),
                ).to_bytes()
            with times.on_server("masked_input"):
                server.receive(message)
    with times.on_server("unmask"):
        bundle = server.bundle().to_bytes()
    start = time.perf_counter()
    plain = authority.decrypt(bundle, layout, round_id)
    times.server["unmask"] += time.perf_counter() - start  # the key authority's share, reported with the server's
    clipping = ClippingReport(plain.clipped, len(plain.included) * (layout.update_length + len(config.metrics)))
    warn_clipping(clipping)
    return AggregationResult(
        total=plain.arrays,
        included=list(plain.included),
        example_count=plain.example_count,
        metrics=plain.metrics,
        clipping=clipping,
        error_bound=config.release_error_bound(len(plain.included)),
        transcript=None,  # no masking transcript: the server's view is its ciphertexts (HEServer)
        words=None,
        times=times,
        bytes_sent=dict(server.bytes_in),
    )
