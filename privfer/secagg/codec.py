"""The byte-level codec of the protocol messages: bounded reading of untrusted bytes, client-id lists in
increasing order, tables of blobs, fixed-size entries, key tables, id runs, and the field validators the message
catalog (:mod:`privfer.secagg.messages`) declares. Every count and length is checked against its limit before the
bytes are read (protocols/secagg/SPEC.md gives the layouts)."""

from __future__ import annotations

import struct
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from privfer.secagg.config import MAX_CLIENTS
from privfer.secagg.errors import DuplicateSender, MalformedMessage
from privfer.secagg.idsets import Runs, check_runs
from privfer.secagg.identity import SIGNATURE_BYTES
from privfer.secagg.keys import COMMITMENT_BYTES, KEY_BYTES
from privfer.secagg.reader import ByteReader
from privfer.secagg.shamir import share_from_bytes

MAGIC = b"PFSA"


MAX_CLIENT_ID = (1 << 31) - 2


SERVER = 0


MAX_BLOB = 1024


MAX_WORDS = 1 << 31


class Reader(ByteReader):
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


def encode_ids(values: tuple[int, ...]) -> bytes:
    return struct.pack(f">I{len(values)}I", len(values), *values)


def encode_blobs(table: dict[int, bytes]) -> bytes:
    """u32 count, then (u32 client, u16 length, bytes) in increasing client order."""
    parts = [struct.pack(">I", len(table))]
    parts.extend(struct.pack(">IH", client, len(table[client])) + table[client] for client in sorted(table))
    return b"".join(parts)


def read_blobs(reader: Reader) -> dict[int, bytes]:
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


def encode_fixed(table: dict[int, bytes]) -> bytes:
    """u32 count, then (u32 client, fixed-size bytes) in increasing client order."""
    parts = [struct.pack(">I", len(table))]
    parts.extend(struct.pack(">I", client) + table[client] for client in sorted(table))
    return b"".join(parts)


def read_fixed(reader: "Reader", size: int) -> dict[int, bytes]:
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


def _signature(value: bytes) -> bytes:
    if len(value) not in (0, SIGNATURE_BYTES):
        raise ValueError(f"a signature is {SIGNATURE_BYTES} bytes (or absent under semi-honest security)")
    return value


Signature = Annotated[bytes, AfterValidator(_signature)]


def _signed_entries(value: dict[int, bytes]) -> dict[int, bytes]:
    if any(len(signature) != SIGNATURE_BYTES for signature in value.values()):
        raise ValueError(f"signatures are {SIGNATURE_BYTES} bytes")
    return value


Signatures = Annotated[dict[int, bytes], AfterValidator(_signed_entries)]


def encode_key_table(keys: dict[int, tuple[bytes, bytes]], signatures: dict[int, bytes]) -> bytes:
    """u32 count, then (u32 client, c_pk, s_pk) in increasing client order; u8 signed (0 or 1), and when signed
    each entry's 64-byte advertisement signature in the same order."""
    if signatures and set(signatures) != set(keys):
        raise MalformedMessage("a signed roster carries one signature per listed client")
    parts = [struct.pack(">I", len(keys))]
    parts.extend(struct.pack(">I", client) + keys[client][0] + keys[client][1] for client in sorted(keys))
    parts.append(bytes([1 if signatures else 0]))
    parts.extend(signatures[client] for client in sorted(signatures))
    return b"".join(parts)


def read_key_table(reader: Reader) -> tuple[dict[int, tuple[bytes, bytes]], dict[int, bytes]]:
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


def encode_runs(runs: Runs) -> bytes:
    """u32 count, then (u32 first, u32 count) per run."""
    return struct.pack(f">I{2 * len(runs)}I", len(runs), *(x for run in runs for x in run))


def id_set(value: Any) -> Runs:
    """Id runs in canonical form (at most MAX_CLIENTS ids), else MalformedMessage: the decoder, the message
    constructors and the clients (which re-check objects handed to them in process) all check them here."""
    try:
        return check_runs(tuple(tuple(run) for run in value), MAX_CLIENTS)
    except (TypeError, ValueError) as exc:
        raise MalformedMessage(f"id runs: {exc}") from None


def read_runs(reader: Reader) -> Runs:
    return id_set((reader.u32(), reader.u32()) for _ in range(reader.count()))


IdSet = Annotated[tuple[tuple[int, int], ...], AfterValidator(id_set)]
