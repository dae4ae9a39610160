"""Sets of client ids as runs of consecutive ids: the compact, canonical form of a round's roster.

A group roster (SPEC section 6.1) must let every client derive the round's
graph itself — from the ids of every client that advertised keys — without
sending every id: servers number their clients 1..n, so the set is a few runs
``(first, count)`` (one, plus one per gap a client that never advertised
leaves), 8 bytes each. The form is canonical: runs in increasing order, each
non-empty, with at least one missing id between two runs.
"""

from __future__ import annotations

from bisect import bisect_right
from functools import lru_cache
from typing import Iterable

MAX_ID = (1 << 31) - 2

Runs = tuple[tuple[int, int], ...]


def id_runs(ids: Iterable[int]) -> Runs:
    """The canonical runs of a set of ids."""
    runs: list[list[int]] = []
    for value in sorted(set(ids)):
        if runs and runs[-1][0] + runs[-1][1] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return tuple((first, count) for first, count in runs)


def check_runs(runs: Runs, limit: int) -> Runs:
    """``runs`` if canonical, with ids in 1..2^31 - 2 and at most ``limit`` ids in all; else ValueError."""
    total, end = 0, 0  # end: one past the last id of the previous run
    for first, count in runs:
        if isinstance(first, bool) or isinstance(count, bool) or not isinstance(first, int) \
                or not isinstance(count, int):
            raise ValueError("runs are pairs of integers (first id, count)")
        if count < 1 or first < 1 or first + count - 1 > MAX_ID:
            raise ValueError(f"run ({first}, {count}) is empty or leaves the ids 1..{MAX_ID}")
        if first <= end:
            raise ValueError("runs must be increasing with a gap between two runs (the canonical form)")
        total += count
        if total > limit:
            raise ValueError(f"the runs hold more than {limit} ids")
        end = first + count
    return runs


def runs_size(runs: Runs) -> int:
    return sum(count for _, count in runs)


@lru_cache(maxsize=8)
def expand_runs(runs: Runs) -> tuple[int, ...]:
    """Every id, increasing (cached by value: the clients of an in-process round expand a roster once)."""
    return tuple(value for first, count in runs for value in range(first, first + count))


def in_runs(runs: Runs, value: int) -> bool:
    """Whether ``value`` is in the set, in O(log runs)."""
    index = bisect_right(runs, (value, MAX_ID + 1)) - 1
    return index >= 0 and runs[index][0] <= value < runs[index][0] + runs[index][1]


def runs_within(inner: Runs, outer: Runs) -> bool:
    """Whether every id of ``inner`` is in ``outer`` (each inner run inside one outer run), in O(runs)."""
    j = 0
    for first, count in inner:
        while j < len(outer) and outer[j][0] + outer[j][1] <= first:
            j += 1
        if j == len(outer) or outer[j][0] > first or first + count > outer[j][0] + outer[j][1]:
            return False
    return True


__all__ = ["Runs", "check_runs", "expand_runs", "id_runs", "in_runs", "runs_size", "runs_within"]
