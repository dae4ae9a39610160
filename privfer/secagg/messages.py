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
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from privfer.secagg.codec import (MAGIC, MAX_BLOB, MAX_CLIENT_ID, MAX_WORDS, PAIR_BYTES, SERVER, ClientId, Commitments,
                                  IdSet, Reader, Shares, Signature, Signatures, encode_blobs, encode_fixed, encode_ids,
                                  encode_key_table, encode_runs, id_set, read_blobs, read_fixed, read_key_table,
                                  read_runs)
from privfer.secagg.config import PROTOCOL_VERSION
from privfer.secagg.errors import MalformedMessage, UnknownSender, UnsupportedVersion, WrongRound, WrongVectorLength
from privfer.secagg.idsets import Runs, id_runs, in_runs, runs_size
from privfer.secagg.identity import SIGNATURE_BYTES
from privfer.secagg.keys import COMMITMENT_BYTES, KEY_BYTES
from privfer.secagg.prg import word_dtype
from privfer.secagg.shamir import SHARE_BYTES


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
    def _read_body(cls, reader: Reader, header: dict) -> "Message":
        raise NotImplementedError

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Message":
        message = decode(raw)
        if not isinstance(message, cls):
            raise MalformedMessage(f"expected a {cls.__name__}, got a {type(message).__name__}")
        return message


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
    def _read_body(cls, reader: Reader, header: dict) -> "AdvertiseKeys":
        c_public, s_public = reader.take(KEY_BYTES), reader.take(KEY_BYTES)
        return cls(**header, c_public=c_public, s_public=s_public, signature=reader.take(reader.u8()))


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
        return encode_key_table(self.keys, self.signatures)

    @classmethod
    def _read_body(cls, reader: Reader, header: dict) -> "KeyRoster":
        keys, signatures = read_key_table(reader)
        return cls(**header, keys=keys, signatures=signatures)


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
        return struct.pack(">I", self.receiver) + encode_runs(self.members) + encode_key_table(self.keys, self.signatures)

    @classmethod
    def _read_body(cls, reader: Reader, header: dict) -> "GroupRoster":
        receiver = reader.client_id()
        members = read_runs(reader)
        keys, signatures = read_key_table(reader)
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
        return (encode_blobs(self.ciphertexts) + encode_fixed(self.commitments) + self.seed_commitment
                + bytes([len(self.signature)]) + self.signature)

    @classmethod
    def _read_body(cls, reader: Reader, header: dict) -> "ShareKeys":
        ciphertexts = read_blobs(reader)
        commitments = read_fixed(reader, PAIR_BYTES)
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
        return (struct.pack(">I", self.receiver) + encode_blobs(self.ciphertexts) + encode_fixed(self.commitments)
                + encode_blobs(self.proofs))

    @classmethod
    def _read_body(cls, reader: Reader, header: dict) -> "ForwardedShares":
        receiver = reader.client_id()
        ciphertexts = read_blobs(reader)
        commitments = read_fixed(reader, PAIR_BYTES)
        return cls(**header, receiver=receiver, ciphertexts=ciphertexts, commitments=commitments,
                   proofs=read_blobs(reader))


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
        return struct.pack(">BI", self.modulus_bits, words.size) + words.tobytes() + encode_fixed(self.complaints)

    @classmethod
    def _read_body(cls, reader: Reader, header: dict) -> "MaskedInput":
        bits, length = reader.u8(), reader.u32()
        if bits not in (32, 64):
            raise MalformedMessage(f"modulus_bits {bits} is not 32 or 64")
        if length > MAX_WORDS:
            raise WrongVectorLength(f"vector of {length} words exceeds {MAX_WORDS}")
        dtype = word_dtype(bits)
        vector = np.frombuffer(reader.take(length * dtype.itemsize), dtype=dtype)
        return cls(**header, modulus_bits=bits, vector=vector, complaints=read_fixed(reader, KEY_BYTES))


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
        return encode_ids(self.survivors) + encode_ids(self.dropped)

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
    def _read_body(cls, reader: Reader, header: dict) -> "UnmaskRequest":
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
        return struct.pack(">I", self.receiver) + encode_runs(self.survivors) + encode_ids(self.dropped)

    @classmethod
    def _read_body(cls, reader: Reader, header: dict) -> "GroupUnmaskRequest":
        receiver = reader.client_id()
        survivors = read_runs(reader)
        return cls(**header, receiver=receiver, survivors=survivors, dropped=reader.ids())


class UnmaskResponse(Message):
    """Stage 3, client -> server: shares of survivors' self-mask seeds and of dropped clients' mask keys."""

    KIND: ClassVar[int] = 7
    seed_shares: Shares
    key_shares: Shares

    def _body(self) -> bytes:
        return encode_fixed(self.seed_shares) + encode_fixed(self.key_shares)

    @classmethod
    def _read_body(cls, reader: Reader, header: dict) -> "UnmaskResponse":
        seed_shares = read_fixed(reader, SHARE_BYTES)
        return cls(**header, seed_shares=seed_shares, key_shares=read_fixed(reader, SHARE_BYTES))


class ConsistencySignature(Message):
    """Stage 3a, client -> server (``security = "active"``): the client's Ed25519 signature on its statement —
    the round, its roster's ids, the survivors of the unmask request, the digest of the model and plan it trained
    with, and the round's config (section 6.4). An honest client signs one statement per round."""

    KIND: ClassVar[int] = 10
    signature: bytes = Field(..., min_length=SIGNATURE_BYTES, max_length=SIGNATURE_BYTES)

    def _body(self) -> bytes:
        return self.signature

    @classmethod
    def _read_body(cls, reader: Reader, header: dict) -> "ConsistencySignature":
        return cls(**header, signature=reader.take(SIGNATURE_BYTES))


class SignatureList(Message):
    """Stage 3b, server -> clients (``security = "active"``): the survivors' consistency signatures it collected.
    A client reveals shares only when enough of them verify on exactly its own statement."""

    KIND: ClassVar[int] = 11
    signatures: Signatures

    def _body(self) -> bytes:
        return encode_fixed(self.signatures)

    @classmethod
    def _read_body(cls, reader: Reader, header: dict) -> "SignatureList":
        return cls(**header, signatures=read_fixed(reader, SIGNATURE_BYTES))


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
    reader = Reader(bytes(raw))
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


def check_header(message: Message, round_id: str, sender: int | None = None) -> None:
    """WrongRound unless ``message`` is of ``round_id``; UnknownSender unless it is from ``sender`` (if given)."""
    if message.round_id != round_id:
        raise WrongRound(f"message of round {message.round_id!r} in round {round_id!r}")
    if sender is not None and message.sender != sender:
        raise UnknownSender(f"expected a message from {sender}, got one from {message.sender}")

__all__ = ["KINDS", "MAGIC", "MAX_BLOB", "MAX_CLIENT_ID", "MAX_WORDS", "PAIR_BYTES", "SERVER", "AdvertiseKeys",
           "ConsistencySignature", "ForwardedShares", "GroupRoster", "GroupUnmaskRequest", "KeyRoster", "MaskedInput",
           "Message", "ShareKeys", "SignatureList", "UnmaskRequest", "UnmaskResponse", "check_header", "decode", "id_set"]
