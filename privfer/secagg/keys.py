"""Key agreement and share encryption: X25519, HKDF-SHA256, AES-256-GCM.

Each client holds two X25519 key pairs for a round: one to agree share-
encryption keys (``c``), one to agree pairwise mask seeds (``s``). A derived key
is HKDF-SHA256 over the X25519 shared secret with no salt and the info string

    b"privfer-secagg/v1/" + purpose + b"/" + len(round_id) (1 byte) + round_id
        + min(u, v) (4 bytes BE) + max(u, v) (4 bytes BE)

so keys are bound to the purpose, the round and the unordered pair of clients.
Shares are encrypted with AES-256-GCM under the ``share`` key with a random
96-bit nonce and associated data binding version, round, sender and receiver.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privfer.secagg.config import PROTOCOL_VERSION
from privfer.secagg.errors import MalformedMessage, ShareAuthenticationError
from privfer.secagg.randomness import SYSTEM, Randomness

KEY_BYTES = 32
NONCE_BYTES = 12
PURPOSE_MASK = b"mask"
PURPOSE_SHARE = b"share"
_LABEL = b"privfer-secagg/v1/"


@lru_cache(maxsize=64)  # called for every key, commitment and share of a round: tens of thousands of times
def round_bytes(round_id: str) -> bytes:
    encoded = round_id.encode("utf-8")
    if not 1 <= len(encoded) <= 255:
        raise ValueError("round_id must be 1 to 255 bytes of UTF-8")
    return bytes([len(encoded)]) + encoded


def kdf_info(purpose: bytes, round_id: str, a: int, b: int) -> bytes:
    """Mask seeds are symmetric (the pair in increasing order); share keys are directed, (dealer, holder) as
    given: the key a holder reveals in a complaint opens the dealer's ciphertext to it, never its own to the
    dealer (SPEC 3.2)."""
    first, second = (a, b) if purpose == PURPOSE_SHARE else sorted((a, b))
    return _LABEL + purpose + b"/" + round_bytes(round_id) + struct.pack(">II", first, second)


def derive_key(secret: bytes, purpose: bytes, round_id: str, a: int, b: int) -> bytes:
    """HKDF-SHA256(secret, salt=None, info=kdf_info(...)) -> 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=kdf_info(purpose, round_id, a, b)).derive(
        secret
    )


COMMITMENT_BYTES = 32
_COMMIT_LABEL = b"privfer-secagg/v2/commit/"


def commitment(kind: bytes, round_id: str, dealer: int, holder: int, value: bytes) -> bytes:
    """SHA-256 commitment to a dealt value, bound to its round, dealer and holder (holder 0: the secret itself).

    Hiding without a salt: every committed value has at least 256 bits of entropy (a 32-byte seed, or a
    Shamir share: 9 field elements, uniformly random given fewer than t other shares)."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(_COMMIT_LABEL + kind + b"/" + round_bytes(round_id) + struct.pack(">II", dealer, holder) + value)
    return digest.finalize()


def share_commitments(round_id: str, dealer: int, holder: int, seed_share: bytes, key_share: bytes) -> bytes:
    """The 64 bytes a dealer publishes for one holder: commitments to its share of b and its share of s."""
    return (commitment(b"seed-share", round_id, dealer, holder, seed_share)
            + commitment(b"key-share", round_id, dealer, holder, key_share))


def seed_commitment(round_id: str, dealer: int, seed: bytes) -> bytes:
    """The commitment to a client's self-mask seed b (its reconstruction is checked against it)."""
    return commitment(b"seed", round_id, dealer, 0, seed)


def public_of_private(raw: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key (a reconstructed s is checked against its advertised key)."""
    return public_bytes(X25519PrivateKey.from_private_bytes(raw).public_key())


def public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def load_public(raw: bytes) -> X25519PublicKey:
    if len(raw) != KEY_BYTES:
        raise MalformedMessage(f"an X25519 public key is {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def check_public_key(raw: bytes) -> None:
    """Reject keys no honest client sends: wrong length, or a low-order point (all-zero shared secret)."""
    try:
        X25519PrivateKey.generate().exchange(load_public(raw))
    except ValueError:
        raise MalformedMessage("public key is a low-order point") from None


def shared_secret(private: X25519PrivateKey | bytes, peer_public: bytes) -> bytes:
    """The raw X25519 shared secret (never used as a key itself: :func:`derive_key` binds it first)."""
    if isinstance(private, (bytes, bytearray)):
        private = X25519PrivateKey.from_private_bytes(bytes(private))
    try:
        return private.exchange(load_public(peer_public))
    except ValueError:
        # X25519 rejects low-order points (an all-zero shared secret).
        raise MalformedMessage("peer public key is a low-order point") from None


def agree(private: X25519PrivateKey | bytes, peer_public: bytes, purpose: bytes, round_id: str, a: int, b: int) -> bytes:
    """The 32-byte key two clients share for ``purpose`` in ``round_id``."""
    return derive_key(shared_secret(private, peer_public), purpose, round_id, a, b)


@dataclass
class KeyPairs:
    """A client's two X25519 key pairs for one round (``c``: share encryption, ``s``: masks)."""

    c_private: X25519PrivateKey
    s_private: X25519PrivateKey

    @classmethod
    def generate(cls, randomness: Randomness = SYSTEM) -> "KeyPairs":
        if not randomness.deterministic:
            return cls(X25519PrivateKey.generate(), X25519PrivateKey.generate())  # OS CSPRNG inside OpenSSL
        return cls(
            X25519PrivateKey.from_private_bytes(randomness.bytes(KEY_BYTES)),
            X25519PrivateKey.from_private_bytes(randomness.bytes(KEY_BYTES)),
        )

    @classmethod
    def from_private_bytes(cls, c_private: bytes, s_private: bytes) -> "KeyPairs":
        return cls(X25519PrivateKey.from_private_bytes(c_private), X25519PrivateKey.from_private_bytes(s_private))

    @property
    def c_public(self) -> bytes:
        return public_bytes(self.c_private.public_key())

    @property
    def s_public(self) -> bytes:
        return public_bytes(self.s_private.public_key())

    def s_secret(self) -> bytes:
        return private_bytes(self.s_private)


def share_aad(round_id: str, sender: int, receiver: int, roster: bytes) -> bytes:
    """Binds a share to its round, its pair and (version 3) the digest of the roster's ids the DEALER saw: a
    holder shown another roster than the dealer cannot open the share, so every holder of a client's shares
    shares its view of U1 (what the consistency check's threshold counts on, SPEC section 5)."""
    return b"privfer-secagg/v1/share-aad" + bytes([PROTOCOL_VERSION]) + round_bytes(round_id) + struct.pack(
        ">II", sender, receiver
    ) + roster


def encrypt_share(key: bytes, plaintext: bytes, round_id: str, sender: int, receiver: int, roster: bytes,
                  randomness: Randomness = SYSTEM) -> bytes:
    """nonce (12 bytes) || AES-256-GCM(key, nonce, plaintext, aad=share_aad(...))."""
    nonce = randomness.bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, share_aad(round_id, sender, receiver, roster))


def decrypt_share(key: bytes, blob: bytes, round_id: str, sender: int, receiver: int, roster: bytes) -> bytes:
    if len(blob) < NONCE_BYTES + 16:
        raise ShareAuthenticationError("encrypted share is too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                   share_aad(round_id, sender, receiver, roster))
    except InvalidTag:
        raise ShareAuthenticationError(
            f"share from client {sender} to {receiver} failed authentication (tampered, misrouted, another round, "
            "or a dealer shown another roster)"
        ) from None
