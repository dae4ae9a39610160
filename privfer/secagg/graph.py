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
from functools import lru_cache
from types import MappingProxyType
from typing import Iterable, Mapping

import numpy as np

from privfer.secagg.idsets import Runs, expand_runs, runs_size
from privfer.secagg.keys import round_bytes
from privfer.secagg.prg import expand


def graph_seed(round_id: str, roster: Mapping[int, object] | Iterable[int]) -> bytes:
    """SHA-256 of the round id and the roster's sorted client ids (each as 4 big-endian bytes)."""
    ids = np.array(sorted(roster), dtype=">u4")
    return _graph_seed(round_id, ids.tobytes())


@lru_cache(maxsize=16)
def _graph_seed(round_id: str, packed_ids: bytes) -> bytes:
    return hashlib.sha256(b"privfer-secagg/v1/graph" + round_bytes(round_id) + packed_ids).digest()


def ring_order(ids: list[int], seed: bytes) -> list[int]:
    keys = expand(seed, len(ids), 64)
    ordered = sorted(ids)
    return [ordered[i] for i in np.argsort(keys, kind="stable")]


def neighbourhoods(ids: Iterable[int], degree: int, seed: bytes | None = None) -> Mapping[int, frozenset[int]]:
    """Each participant's neighbours (itself excluded). ``degree >= len(ids) - 1`` gives the complete graph.

    The graph is a pure function of its arguments; the last few are cached (read-only), so the clients of an
    in-process round — and the server — derive it once, not once each (O(n k) instead of O(n^2 k))."""
    return _neighbourhoods(tuple(sorted(ids)), int(degree), seed)


@lru_cache(maxsize=2)
def _neighbourhoods(ids: tuple[int, ...], degree: int, seed: bytes | None) -> Mapping[int, frozenset[int]]:
    n = len(ids)
    if degree >= n - 1:
        everyone = frozenset(ids)
        return MappingProxyType({u: everyone - {u} for u in ids})
    if seed is None:
        raise ValueError("a sparse graph needs the public seed")
    if degree % 2:
        raise ValueError("the Harary degree must be even")
    ring = np.asarray(ring_order(list(ids), seed), dtype=np.int64)
    half = degree // 2
    steps = np.array([step for step in range(-half, half + 1) if step], dtype=np.int64)
    table = ring[(np.arange(n)[:, None] + steps[None, :]) % n].tolist()  # row i: the ring neighbours of ring[i]
    return MappingProxyType({int(u): frozenset(row) for u, row in zip(ring.tolist(), table)})


@lru_cache(maxsize=4)
def _ring(round_id: str, members: Runs) -> tuple[np.ndarray, np.ndarray]:
    """The ring of the ids ``members`` holds, and each sorted id's ring position: O(n) memory, cached by value so
    the clients of an in-process round build it once."""
    ids = expand_runs(members)
    order = np.argsort(expand(graph_seed(round_id, ids), len(ids), 64), kind="stable")  # as ring_order
    ring = np.asarray(ids, dtype=np.int64)[order]
    position = np.empty(len(ids), dtype=np.int64)
    position[order] = np.arange(len(ids))
    return ring, position


def client_group(round_id: str, members: Runs, degree: int, client: int) -> frozenset[int]:
    """``client`` and its neighbours on the round's graph over the ids ``members`` holds (the same graph as
    :func:`neighbourhoods`), without building every other client's row: what one client needs."""
    n = runs_size(members)
    if degree >= n - 1:
        return frozenset(expand_runs(members))
    if degree % 2:
        raise ValueError("the Harary degree must be even")
    ring, position = _ring(round_id, members)
    index = 0  # the client's index among the sorted ids, from the runs
    for first, count in members:
        if first <= client < first + count:
            index += client - first
            break
        index += count
    else:
        raise ValueError(f"client {client} is not in the roster")
    half = degree // 2
    at = int(position[index])
    return frozenset(int(v) for v in ring[(at + np.arange(-half, half + 1)) % n])
