"""The wire: updates sealed to the key authority (X25519 + AES-GCM, bound to round and sender), the signed
statement, and the HE message codec."""

from __future__ import annotations

import secrets
import struct
from typing import ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from privfer.secagg.errors import DuplicateSender, MalformedMessage, UnsupportedVersion
from privfer.secagg.he.config import HE_MAGIC, HE_PROTOCOL_VERSION, MAX_CIPHERTEXT_BYTES, InvalidCiphertext
from privfer.secagg.identity import SIGNATURE_BYTES

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
