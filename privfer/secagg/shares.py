"""A dealer's Shamir shares for one holder: the plaintext bundle, and opening it — decrypt, parse, check against the
dealer's commitments — which a holder does, and the server does to check a complaint (section 3.4)."""

from __future__ import annotations

import hmac
import struct

import numpy as np

from privfer.secagg import shamir
from privfer.secagg.errors import InconsistentShares, MalformedMessage, UnknownSender
from privfer.secagg.keys import decrypt_share, share_commitments

_PLAINTEXT = struct.Struct(">II")


def share_plaintext(sender: int, receiver: int, seed_share: np.ndarray, key_share: np.ndarray) -> bytes:
    return _PLAINTEXT.pack(sender, receiver) + shamir.share_to_bytes(seed_share) + shamir.share_to_bytes(key_share)


def parse_share_plaintext(raw: bytes) -> tuple[int, int, np.ndarray, np.ndarray]:
    if len(raw) != _PLAINTEXT.size + 2 * shamir.SHARE_BYTES:
        raise MalformedMessage("decrypted share bundle has the wrong length")
    sender, receiver = _PLAINTEXT.unpack_from(raw)
    body = raw[_PLAINTEXT.size :]
    try:
        return (sender, receiver, shamir.share_from_bytes(body[: shamir.SHARE_BYTES]),
                shamir.share_from_bytes(body[shamir.SHARE_BYTES :]))
    except ValueError:
        raise InconsistentShares(f"client {sender} dealt a share word outside the field", senders=(sender,)) from None


def open_share(key: bytes, blob: bytes, round_id: str, dealer: int, holder: int, roster: bytes,
               committed: bytes | None) -> tuple[np.ndarray, np.ndarray]:
    """Decrypt a dealer's shares for a holder and check them against the dealer's commitments: what a holder does,
    and what anyone given the pair's key does to check a complaint. Raises ShareAuthenticationError,
    MalformedMessage, UnknownSender or InconsistentShares (each the dealer's fault when its deal is signed)."""
    plaintext = decrypt_share(key, blob, round_id, dealer, holder, roster)
    inner_sender, inner_receiver, seed_share, key_share = parse_share_plaintext(plaintext)
    if (inner_sender, inner_receiver) != (dealer, holder):
        raise UnknownSender("a share bundle names other clients than the envelope")
    if committed is None or not hmac.compare_digest(committed, share_commitments(
            round_id, dealer, holder, shamir.share_to_bytes(seed_share), shamir.share_to_bytes(key_share))):
        # the dealer committed to other shares than it sent (or the commitment was altered): a share returned
        # later could not be told from a tampered one
        raise InconsistentShares(f"client {dealer}'s shares for client {holder} do not match its commitments "
                                 "(the dealer, or the server relaying them, is at fault)", senders=(dealer,))
    return seed_share, key_share


__all__ = ["open_share", "parse_share_plaintext", "share_plaintext"]
