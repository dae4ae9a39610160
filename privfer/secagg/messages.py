"""Typed, versioned protocol messages with a compact binary encoding.

Every message starts with the same header — magic ``PFSA``, protocol version,
message kind, round id, sender id (0 = the server) — so each one is bound to
its round and sender. Bodies are fixed-layout big-endian fields; masked vectors
travel as raw little-endian words, not JSON lists. ``decode`` checks every
length against the bytes actually present and raises a specific
:class:`~privfer.secagg.errors.MessageError` subclass; protocol-level checks
(right round, known sender, expected length) are made by the receiving party.
protocols/secagg/SPEC.md gives the byte layouts.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from privfer.secagg.config import MAX_CLIENTS, PROTOCOL_VERSION
from privfer.secagg.errors import DuplicateSender, MalformedMessage, UnsupportedVersion, WrongVectorLength
from privfer.secagg.idsets import Runs, check_runs, id_runs, in_runs, runs_size
from privfer.secagg.identity import SIGNATURE_BYTES
from privfer.secagg.keys import COMMITMENT_BYTES, KEY_BYTES
from privfer.secagg.prg import word_dtype
from privfer.secagg.reader import ByteReader
from privfer.secagg.shamir import SHARE_BYTES, share_from_bytes

MAGIC = b"PFSA"
MAX_CLIENT_ID = (1 << 31) - 2
SERVER = 0
MAX_BLOB = 1024
MAX_WORDS = 1 << 31


class _Reader(ByteReader):
    def count(self, limit: int = MAX_CLIENTS) -> int:
        n = self.u32()
        if n > limit:
            raise MalformedMessage(f"list of {n} entries exceeds the limit of {limit}")
        return n

    def client_id(self, after: int = 0) -> int:
        """A client id in 1..2^31 - 2, strictly greater than ``after`` (lists are in increasing order)."""
        value = self.u32()
        if not 1 <= value <= MAX_CLIENT_ID:
            raise MalformedMessage(f"client id {value} is outside 1..{MAX_CLIENT_ID}")
        if value == after:
            raise DuplicateSender(f"client {value} is listed twice")
        if value < after:
            raise MalformedMessage(f"client ids must be in increasing order ({value} after {after})")
        return value

    def ids(self) -> tuple[int, ...]:
        values: list[int] = []
        for _ in range(self.count()):
            values.append(self.client_id(values[-1] if values else 0))
        return tuple(values)



def _ids(values: tuple[int, ...]) -> bytes:
    return struct.pack(f">I{len(values)}I", len(values), *values)


def _blobs(table: dict[int, bytes]) -> bytes:
    """u32 count, then (u32 client, u16 length, bytes) in increasing client order."""
    parts = [struct.pack(">I", len(table))]
    parts.extend(struct.pack(">IH", client, len(table[client])) + table[client] for client in sorted(table))
    return b"".join(parts)


def _read_blobs(reader: _Reader) -> dict[int, bytes]:
    table: dict[int, bytes] = {}
    last = 0
    for _ in range(reader.count()):
        last = reader.client_id(last)
        size = reader.u16()
        if size > MAX_BLOB:
            raise MalformedMessage(f"share ciphertext of {size} bytes exceeds {MAX_BLOB}")
        table[last] = reader.take(size)
    return table


PAIR_BYTES = 2 * COMMITMENT_BYTES  # a holder's commitments: to its share of b, to its share of s


def _fixed(table: dict[int, bytes]) -> bytes:
    """u32 count, then (u32 client, fixed-size bytes) in increasing client order."""
    parts = [struct.pack(">I", len(table))]
    parts.extend(struct.pack(">I", client) + table[client] for client in sorted(table))
    return b"".join(parts)


def _read_fixed(reader: "_Reader", size: int) -> dict[int, bytes]:
    table: dict[int, bytes] = {}
    last = 0
    for _ in range(reader.count()):
        last = reader.client_id(last)
        table[last] = reader.take(size)
    return table


def _pair_sizes(value: dict[int, bytes]) -> dict[int, bytes]:
    if any(len(pair) != PAIR_BYTES for pair in value.values()):
        raise ValueError(f"share commitments are {PAIR_BYTES} bytes per holder")
    return value


def _field_shares(value: dict[int, bytes]) -> dict[int, bytes]:
    for share in value.values():
        share_from_bytes(share)  # SHARE_BYTES long, every word an element of F_p (section 3.4); else ValueError
    return value


Commitments = Annotated[dict[int, bytes], AfterValidator(_pair_sizes)]
Shares = Annotated[dict[int, bytes], AfterValidator(_field_shares)]


ClientId = Field(..., ge=1, le=(1 << 31) - 2)


class Message(BaseModel):
    """Header fields shared by all messages."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)
    KIND: ClassVar[int] = 0

    round_id: str = Field(..., min_length=1, max_length=255)
    sender: int = Field(..., ge=0, le=(1 << 31) - 2)
    version: int = PROTOCOL_VERSION

    @field_validator("round_id")
    @classmethod
    def _round_bytes(cls, value: str) -> str:
        if len(value.encode("utf-8")) > 255:
            raise ValueError("round_id must be at most 255 bytes of UTF-8")
        return value

    def _header(self) -> bytes:
        encoded = self.round_id.encode("utf-8")
        return MAGIC + bytes([self.version, self.KIND, len(encoded)]) + encoded + struct.pack(">I", self.sender)

    def _body(self) -> bytes:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        return self._header() + self._body()

    @classmethod
    def _read_body(cls, reader: _Reader, header: dict) -> "Message":
        raise NotImplementedError

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Message":
        message = decode(raw)
        if not isinstance(message, cls):
            raise MalformedMessage(f"expected a {cls.__name__}, got a {type(message).__name__}")
        return message


def _signature(value: bytes) -> bytes:
    if len(value) not in (0, SIGNATURE_BYTES):
        raise ValueError(f"a signature is {SIGNATURE_BYTES} bytes (or absent under semi-honest security)")
    return value


Signature = Annotated[bytes, AfterValidator(_signature)]


class AdvertiseKeys(Message):
    """Stage 0, client -> server: the client's two X25519 public keys and, under active security, its enrolled
    identity's Ed25519 signature over (study, round, sender, both keys) — section 3.8."""

    KIND: ClassVar[int] = 1
    c_public: bytes
    s_public: bytes
    signature: Signature = b""

    @field_validator("c_public", "s_public")
    @classmethod
    def _key_length(cls, value: bytes) -> bytes:
        if len(value) != KEY_BYTES:
            raise ValueError(f"public keys are {KEY_BYTES} bytes")
        return value

    def _body(self) -> bytes:
        return self.c_public + self.s_public + bytes([len(self.signature)]) + self.signature

    @classmethod
    def _read_body(cls, reader: _Reader, header: dict) -> "AdvertiseKeys":
        c_public, s_public = reader.take(KEY_BYTES), reader.take(KEY_BYTES)
        return cls(**header, c_public=c_public, s_public=s_public, signature=reader.take(reader.u8()))


def _signed_entries(value: dict[int, bytes]) -> dict[int, bytes]:
    if any(len(signature) != SIGNATURE_BYTES for signature in value.values()):
        raise ValueError(f"signatures are {SIGNATURE_BYTES} bytes")
    return value


Signatures = Annotated[dict[int, bytes], AfterValidator(_signed_entries)]


def _key_table(keys: dict[int, tuple[bytes, bytes]], signatures: dict[int, bytes]) -> bytes:
    """u32 count, then (u32 client, c_pk, s_pk) in increasing client order; u8 signed (0 or 1), and when signed
    each entry's 64-byte advertisement signature in the same order."""
    if signatures and set(signatures) != set(keys):
        raise MalformedMessage("a signed roster carries one signature per listed client")
    parts = [struct.pack(">I", len(keys))]
    parts.extend(struct.pack(">I", client) + keys[client][0] + keys[client][1] for client in sorted(keys))
    parts.append(bytes([1 if signatures else 0]))
    parts.extend(signatures[client] for client in sorted(signatures))
    return b"".join(parts)


def _read_key_table(reader: _Reader) -> tuple[dict[int, tuple[bytes, bytes]], dict[int, bytes]]:
    keys: dict[int, tuple[bytes, bytes]] = {}
    client = 0
    for _ in range(reader.count()):
        client = reader.client_id(client)
        keys[client] = (reader.take(KEY_BYTES), reader.take(KEY_BYTES))
    signed = reader.u8()
    if signed not in (0, 1):
        raise MalformedMessage(f"roster signature flag {signed} is not 0 or 1")
    signatures = {client: reader.take(SIGNATURE_BYTES) for client in keys} if signed else {}
    return keys, signatures


def _one_per_entry(message: "KeyRoster | GroupRoster") -> None:
    if message.signatures and set(message.signatures) != set(message.keys):
        raise ValueError("a signed roster carries one signature per listed client")


class KeyRoster(Message):
    """Stage 0 result, server -> clients (``roster = "full"``): every participant's public keys (and, under active
    security, each one's advertisement signature, which every client checks against the roster certificate)."""

    KIND: ClassVar[int] = 2
    keys: dict[int, tuple[bytes, bytes]]
    signatures: Signatures = {}

    def model_post_init(self, _context: Any) -> None:
        _one_per_entry(self)

    @property
    def members(self) -> Runs:
        """The listed ids as runs."""
        return id_runs(self.keys)

    def _body(self) -> bytes:
        return _key_table(self.keys, self.signatures)

    @classmethod
    def _read_body(cls, reader: _Reader, header: dict) -> "KeyRoster":
        keys, signatures = _read_key_table(reader)
        return cls(**header, keys=keys, signatures=signatures)


def _runs(runs: Runs) -> bytes:
    """u32 count, then (u32 first, u32 count) per run."""
    return struct.pack(f">I{2 * len(runs)}I", len(runs), *(x for run in runs for x in run))


def id_set(value: Any) -> Runs:
    """Id runs in canonical form (at most MAX_CLIENTS ids), else MalformedMessage: the decoder, the message
    constructors and the clients (which re-check objects handed to them in process) all check them here."""
    try:
        return check_runs(tuple(tuple(run) for run in value), MAX_CLIENTS)
    except (TypeError, ValueError) as exc:
        raise MalformedMessage(f"id runs: {exc}") from None


def _read_runs(reader: _Reader) -> Runs:
    return id_set((reader.u32(), reader.u32()) for _ in range(reader.count()))


IdSet = Annotated[tuple[tuple[int, int], ...], AfterValidator(id_set)]


class GroupRoster(Message):
    """Stage 0 result, server -> one client (``roster = "group"``): the ids of every client that advertised keys,
    as runs of consecutive ids (a few bytes when the server numbers its clients), and the public keys of the
    receiver's group only — O(k + runs) bytes instead of O(n) (SecAgg+, Bell et al. 2020). The receiver derives
    the graph from the ids and checks the keys are exactly its group's."""

    KIND: ClassVar[int] = 8
    receiver: int = ClientId
    members: IdSet
    keys: dict[int, tuple[bytes, bytes]]
    signatures: Signatures = {}

    def model_post_init(self, _context: Any) -> None:
        _one_per_entry(self)

    @property
    def advertised(self) -> int:
        return runs_size(self.members)

    def _body(self) -> bytes:
        return struct.pack(">I", self.receiver) + _runs(self.members) + _key_table(self.keys, self.signatures)

    @classmethod
    def _read_body(cls, reader: _Reader, header: dict) -> "GroupRoster":
        receiver = reader.client_id()
        members = _read_runs(reader)
        keys, signatures = _read_key_table(reader)
        return cls(**header, receiver=receiver, members=members, keys=keys, signatures=signatures)


class ShareKeys(Message):
    """Stage 1, client -> server: one encrypted share bundle per neighbour, the commitments to every share the
    client dealt (its own included), and the commitment to its self-mask seed."""

    KIND: ClassVar[int] = 3
    ciphertexts: dict[int, bytes]
    commitments: Commitments  # holder -> commitment to its share of b || to its share of s
    seed_commitment: bytes = Field(..., min_length=COMMITMENT_BYTES, max_length=COMMITMENT_BYTES)
    signature: Signature = b""  # active security: the dealer's signature on its deal (statements.deal_statement)

    def _body(self) -> bytes:
        return (_blobs(self.ciphertexts) + _fixed(self.commitments) + self.seed_commitment
                + bytes([len(self.signature)]) + self.signature)

    @classmethod
    def _read_body(cls, reader: _Reader, header: dict) -> "ShareKeys":
        ciphertexts = _read_blobs(reader)
        commitments = _read_fixed(reader, PAIR_BYTES)
        seed_commitment = reader.take(COMMITMENT_BYTES)
        return cls(**header, ciphertexts=ciphertexts, commitments=commitments, seed_commitment=seed_commitment,
                   signature=reader.take(reader.u8()))


class ForwardedShares(Message):
    """Stage 1 result, server -> one client: the ciphertexts addressed to it and their dealers' commitments."""

    KIND: ClassVar[int] = 4
    receiver: int = ClientId
    ciphertexts: dict[int, bytes]
    commitments: Commitments  # sender -> its commitments for this receiver's shares
    # active security: sender -> its deal signature (64 bytes) and this receiver's hash-tree path (32 bytes a step)
    proofs: dict[int, bytes] = {}

    def _body(self) -> bytes:
        return (struct.pack(">I", self.receiver) + _blobs(self.ciphertexts) + _fixed(self.commitments)
                + _blobs(self.proofs))

    @classmethod
    def _read_body(cls, reader: _Reader, header: dict) -> "ForwardedShares":
        receiver = reader.client_id()
        ciphertexts = _read_blobs(reader)
        commitments = _read_fixed(reader, PAIR_BYTES)
        return cls(**header, receiver=receiver, ciphertexts=ciphertexts, commitments=commitments,
                   proofs=_read_blobs(reader))


class MaskedInput(Message):
    """Stage 2, client -> server: the masked vector y_u in Z_{2^k} (raw little-endian words)."""

    KIND: ClassVar[int] = 5
    modulus_bits: int
    vector: np.ndarray
    # active security: dealer -> the share key of the pair (32 bytes), revealed because the dealer's signed
    # ciphertext for this client does not open or does not match its commitments (a complaint, SPEC 6.3)
    complaints: dict[int, bytes] = {}

    @field_validator("complaints")
    @classmethod
    def _keys(cls, value: dict[int, bytes]) -> dict[int, bytes]:
        if any(len(key) != KEY_BYTES for key in value.values()):
            raise ValueError(f"a complaint reveals a {KEY_BYTES}-byte share key")
        return value

    @field_validator("modulus_bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in (32, 64):
            raise ValueError("modulus_bits must be 32 or 64")
        return value

    @field_validator("vector")
    @classmethod
    def _vector(cls, value: np.ndarray) -> np.ndarray:
        if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind != "u":
            raise ValueError("vector must be a 1-d unsigned numpy array")
        return value

    def _body(self) -> bytes:
        words = np.ascontiguousarray(self.vector, dtype=word_dtype(self.modulus_bits))
        return struct.pack(">BI", self.modulus_bits, words.size) + words.tobytes() + _fixed(self.complaints)

    @classmethod
    def _read_body(cls, reader: _Reader, header: dict) -> "MaskedInput":
        bits, length = reader.u8(), reader.u32()
        if bits not in (32, 64):
            raise MalformedMessage(f"modulus_bits {bits} is not 32 or 64")
        if length > MAX_WORDS:
            raise WrongVectorLength(f"vector of {length} words exceeds {MAX_WORDS}")
        dtype = word_dtype(bits)
        vector = np.frombuffer(reader.take(length * dtype.itemsize), dtype=dtype)
        return cls(**header, modulus_bits=bits, vector=vector, complaints=_read_fixed(reader, KEY_BYTES))


@lru_cache(maxsize=4)
def _id_set(ids: tuple[int, ...]) -> frozenset[int]:
    """The ids as a set, cached by value: the clients of an in-process round build it once, not once each."""
    return frozenset(ids)


class UnmaskRequest(Message):
    """Stage 3, server -> clients: whose masked inputs arrived (survivors) and who dropped after sharing keys."""

    KIND: ClassVar[int] = 6
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def _body(self) -> bytes:
        return _ids(self.survivors) + _ids(self.dropped)

    @property
    def included(self) -> int:
        """How many inputs the round includes (distinct survivors)."""
        return len(self.survivor_set)

    def survived(self, client: int) -> bool:
        return client in self.survivor_set

    @property
    def survivor_set(self) -> frozenset[int]:
        return _id_set(self.survivors)

    @property
    def dropped_set(self) -> frozenset[int]:
        return _id_set(self.dropped)

    @classmethod
    def _read_body(cls, reader: _Reader, header: dict) -> "UnmaskRequest":
        survivors = reader.ids()
        dropped = reader.ids()
        return cls(**header, survivors=survivors, dropped=dropped)


class GroupUnmaskRequest(Message):
    """Stage 3, server -> one client (``roster = "group"``): the ids of every survivor, as runs (so the client can
    count the included inputs and check them against the roster), and which members of the receiver's group
    dropped."""

    KIND: ClassVar[int] = 9
    receiver: int = ClientId
    survivors: IdSet
    dropped: tuple[int, ...]

    @property
    def included(self) -> int:
        return runs_size(self.survivors)

    def survived(self, client: int) -> bool:
        return in_runs(self.survivors, client)

    def _body(self) -> bytes:
        return struct.pack(">I", self.receiver) + _runs(self.survivors) + _ids(self.dropped)

    @classmethod
    def _read_body(cls, reader: _Reader, header: dict) -> "GroupUnmaskRequest":
        receiver = reader.client_id()
        survivors = _read_runs(reader)
        return cls(**header, receiver=receiver, survivors=survivors, dropped=reader.ids())


class UnmaskResponse(Message):
    """Stage 3, client -> server: shares of survivors' self-mask seeds and of dropped clients' mask keys."""

    KIND: ClassVar[int] = 7
    seed_shares: Shares
    key_shares: Shares

    def _body(self) -> bytes:
        return _fixed(self.seed_shares) + _fixed(self.key_shares)

    @classmethod
    def _read_body(cls, reader: _Reader, header: dict) -> "UnmaskResponse":
        seed_shares = _read_fixed(reader, SHARE_BYTES)
        return cls(**header, seed_shares=seed_shares, key_shares=_read_fixed(reader, SHARE_BYTES))


class ConsistencySignature(Message):
    """Stage 3a, client -> server (``security = "active"``): the client's Ed25519 signature on its statement —
    the round, its roster's ids, the survivors of the unmask request, the digest of the model and plan it trained
    with, and the round's config (section 6.4). An honest client signs one statement per round."""

    KIND: ClassVar[int] = 10
    signature: bytes = Field(..., min_length=SIGNATURE_BYTES, max_length=SIGNATURE_BYTES)

    def _body(self) -> bytes:
        return self.signature

    @classmethod
    def _read_body(cls, reader: _Reader, header: dict) -> "ConsistencySignature":
        return cls(**header, signature=reader.take(SIGNATURE_BYTES))


class SignatureList(Message):
    """Stage 3b, server -> clients (``security = "active"``): the survivors' consistency signatures it collected.
    A client reveals shares only when enough of them verify on exactly its own statement."""

    KIND: ClassVar[int] = 11
    signatures: Signatures

    def _body(self) -> bytes:
        return _fixed(self.signatures)

    @classmethod
    def _read_body(cls, reader: _Reader, header: dict) -> "SignatureList":
        return cls(**header, signatures=_read_fixed(reader, SIGNATURE_BYTES))


KINDS: dict[int, type[Message]] = {
    cls.KIND: cls
    for cls in (AdvertiseKeys, KeyRoster, ShareKeys, ForwardedShares, MaskedInput, UnmaskRequest, UnmaskResponse,
                GroupRoster, GroupUnmaskRequest, ConsistencySignature, SignatureList)
}


def decode(raw: bytes) -> Message:
    """Bytes -> the message they encode; a specific MessageError if they do not."""
    from pydantic import ValidationError

    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"a message is bytes, got {type(raw).__name__}")
    reader = _Reader(bytes(raw))
    if reader.take(4) != MAGIC:
        raise MalformedMessage("not a privfer secure-aggregation message (bad magic)")
    version, kind = reader.u8(), reader.u8()
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {version} is not supported (this is version {PROTOCOL_VERSION})")
    if kind not in KINDS:
        raise MalformedMessage(f"unknown message kind {kind}")
    try:
        round_id = reader.take(reader.u8()).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage("round id is not UTF-8") from None
    header = {"round_id": round_id, "sender": reader.u32(), "version": version}
    try:
        message = KINDS[kind]._read_body(reader, header)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise MalformedMessage(f"{KINDS[kind].__name__}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    reader.end()
    return message
