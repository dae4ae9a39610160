"""The byte strings members sign under active security, and the digests that bind a round's view.

Two statements (protocols/secagg/SPEC.md, section 3.8):

- the **advertisement**: a member's two X25519 keys for one round of one study;
- the **consistency statement**: what a client saw of a round before it reveals
  any share — the roster's ids (U1), the survivors (U3), the digest of the
  model and plan it trained with (the caller's ``context``), and the round's
  config. An honest client signs one consistency statement per round, so
  enough signatures on one statement rule out any other (section 5).

Id sets are digested in their canonical run encoding, so a full roster and a
group roster of the same ids give the same digest.
"""

from __future__ import annotations

import hashlib
import json
import struct
from functools import lru_cache
from typing import Iterable, Mapping

from privfer.secagg.idsets import Runs, id_runs
from privfer.secagg.keys import round_bytes

CONTEXT_BYTES = 32
NO_CONTEXT = bytes(CONTEXT_BYTES)
_ADVERTISE = b"privfer-secagg/v3/advertise"
_STATEMENT = b"privfer-secagg/v3/statement"
_IDS = b"privfer-secagg/v3/ids"
_ROSTER = b"privfer-secagg/v3/roster"


def _study(study: str) -> bytes:
    return round_bytes(study)  # the same 1..255-byte length-prefixed UTF-8


def ids_digest(ids: Iterable[int] | Runs, *, runs: bool = False) -> bytes:
    """SHA-256 of an id set's canonical runs: ``u32 R`` then R x (``u32 first``, ``u32 count``)."""
    canonical = tuple(ids) if runs else id_runs(ids)
    packed = struct.pack(f">I{2 * len(canonical)}I", len(canonical), *(x for run in canonical for x in run))
    return hashlib.sha256(_IDS + packed).digest()


def roster_digest(keys: Mapping[int, tuple[bytes, bytes]]) -> bytes:
    """SHA-256 of a full roster's key table: ``u32 N`` then N x (``u32 id``, ``c_pk``, ``s_pk``), ids increasing.

    What a full-roster client signs and binds its shares to: not only who is in the round but with which round
    keys, so a copy of the round run under the same round id (fresh keys for the same members) has another
    statement, and signatures collected there count for nothing here."""
    digest = hashlib.sha256(_ROSTER + struct.pack(">I", len(keys)))
    for client in sorted(keys):
        c_public, s_public = keys[client]
        digest.update(struct.pack(">I", client) + c_public + s_public)
    return digest.digest()


def config_digest(config: object) -> bytes:
    """SHA-256 of the round's config as canonical JSON (sorted keys, no spaces): two clients given different
    parameters (a threshold, a bound, min_inputs) sign different statements."""
    document = config.model_dump(mode="json")  # type: ignore[attr-defined]
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")).digest()


def advertise_statement(study: str, round_id: str, sender: int, c_public: bytes, s_public: bytes) -> bytes:
    return _ADVERTISE + _study(study) + round_bytes(round_id) + struct.pack(">I", sender) + c_public + s_public


def consistency_statement(study: str, round_id: str, roster: bytes, survivors: bytes, context: bytes,
                          config: bytes) -> bytes:
    """``roster`` is :func:`roster_digest` (full roster) or :func:`ids_digest` (group roster), ``survivors`` an
    :func:`ids_digest`, ``context`` the caller's 32-byte digest of the
    model and plan, ``config`` :func:`config_digest`."""
    if len(context) != CONTEXT_BYTES:
        raise ValueError(f"the round's context is a {CONTEXT_BYTES}-byte digest")
    return _STATEMENT + _study(study) + round_bytes(round_id) + roster + survivors + context + config


def context_digest(*parts: bytes) -> bytes:
    """A round context from its parts (model bytes, plan bytes ...): SHA-256 over each part's length and bytes."""
    digest = hashlib.sha256(b"privfer-secagg/v3/context")
    for part in parts:
        digest.update(struct.pack(">Q", len(part)) + part)
    return digest.digest()


_DEAL = b"privfer-secagg/v3/deal"
_LEAF = b"privfer-secagg/v3/deal-leaf"
_NODE = b"privfer-secagg/v3/deal-node"


def deal_leaf(holder: int, ciphertext: bytes, commitments: bytes) -> bytes:
    """One holder's entry in a dealer's signed deal: its ciphertext (empty for the dealer's own share) and the
    dealer's 64 bytes of commitments to its two shares."""
    return hashlib.sha256(_LEAF + struct.pack(">I", holder) + hashlib.sha256(ciphertext).digest()
                          + commitments).digest()


def _parent(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def merkle_levels(leaves: list[bytes]) -> list[list[bytes]]:
    """A binary hash tree over ``leaves`` (in holder order); an odd last node is carried up unchanged."""
    if not leaves:
        raise ValueError("a deal has at least one holder")
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        level = levels[-1]
        levels.append([_parent(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                       for i in range(0, len(level), 2)])
    return levels


def merkle_path(levels: list[list[bytes]], index: int) -> list[bytes]:
    """The sibling hashes from leaf ``index`` up to the root (a carried-up node has no sibling at its level)."""
    path = []
    for level in levels[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        index //= 2
    return path


def merkle_root_from(leaf: bytes, index: int, count: int, path: list[bytes]) -> bytes:
    """The root a leaf and its path lead to, for a tree of ``count`` leaves; ValueError if the path's length does
    not fit the position."""
    node, width, used = leaf, count, 0
    while width > 1:
        sibling = index ^ 1
        if sibling < width:
            if used >= len(path):
                raise ValueError("the path is too short")
            node = _parent(node, path[used]) if index % 2 == 0 else _parent(path[used], node)
            used += 1
        index //= 2
        width = (width + 1) // 2
    if used != len(path):
        raise ValueError("the path is too long")
    return node


def deal_statement(study: str, round_id: str, dealer: int, holders: int, root: bytes, roster: bytes) -> bytes:
    """What a dealer signs under active security: the hash tree over every holder's ciphertext and commitments,
    and the digest of the roster it dealt under (the one its shares' AAD carries). A holder can then prove to
    anyone that the ciphertext it cannot open is the dealer's own, made for the holder's own roster — a holder
    shown another roster sees an invalid deal and reveals nothing (complaints, SPEC 6.3)."""
    return _DEAL + _study(study) + round_bytes(round_id) + struct.pack(">II", dealer, holders) + root + roster


@lru_cache(maxsize=4)
def cached_ids_digest(ids: tuple[int, ...]) -> bytes:
    """:func:`ids_digest` of a tuple of ids, cached: the clients of an in-process round share one request's
    survivors and hash them once."""
    return ids_digest(ids)


@lru_cache(maxsize=8)
def cached_config_digest(config: object) -> bytes:
    """:func:`config_digest`, cached (a config is frozen and hashable)."""
    return config_digest(config)


__all__ = ["deal_leaf", "deal_statement", "merkle_levels", "merkle_path", "merkle_root_from", "CONTEXT_BYTES", "NO_CONTEXT", "advertise_statement", "cached_config_digest", "cached_ids_digest", "config_digest", "consistency_statement",
           "context_digest", "ids_digest", "roster_digest"]
