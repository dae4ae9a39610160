"""Who masks with whom: the complete graph, or SecAgg+'s random k-regular graph (Bell et al. 2020).

The SecAgg+ graph is a Harary graph on a random ring: the participants are
ordered by a permutation drawn from public randomness, and each is joined to
its k/2 nearest ring neighbours on either side. The public randomness is
SHA-256 over the round id and the sorted ids of the clients in the roster, so
all clients derive the same graph and no client can steer its position by
re-rolling keys. The server still chooses the round id and the roster; a
deployment that does not trust it to leave the graph alone should take the
round id from a public beacon (protocols/secagg/SPEC.md, section 1).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Mapping

import numpy as np

from privfer.secagg.keys import round_bytes
from privfer.secagg.prg import expand


def graph_seed(round_id: str, roster: Mapping[int, object]) -> bytes:
    digest = hashlib.sha256(b"privfer-secagg/v1/graph" + round_bytes(round_id))
    for client in sorted(roster):
        digest.update(struct.pack(">I", client))
    return digest.digest()


def ring_order(ids: list[int], seed: bytes) -> list[int]:
    keys = expand(seed, len(ids), 64)
    ordered = sorted(ids)
    return [ordered[i] for i in np.argsort(keys, kind="stable")]


def neighbourhoods(ids: list[int], degree: int, seed: bytes | None = None) -> dict[int, frozenset[int]]:
    """Each participant's neighbours (itself excluded). ``degree >= len(ids) - 1`` gives the complete graph."""
    ids = sorted(ids)
    n = len(ids)
    if degree >= n - 1:
        everyone = frozenset(ids)
        return {u: everyone - {u} for u in ids}
    if seed is None:
        raise ValueError("a sparse graph needs the public seed")
    if degree % 2:
        raise ValueError("the Harary degree must be even")
    ring = ring_order(ids, seed)
    half = degree // 2
    result: dict[int, frozenset[int]] = {}
    for position, u in enumerate(ring):
        result[u] = frozenset(ring[(position + step) % n] for step in range(-half, half + 1) if step)
    return result
