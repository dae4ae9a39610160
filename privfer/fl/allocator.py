"""glibc's allocator, told to keep the memory a round frees for the next round instead of handing it back.

By default glibc serves blocks above 128 KB (a threshold that adapts up to
32 MB) with fresh ``mmap`` calls and trims the heap's free top beyond 128 KB,
so every round of training faults its tensors' pages in anew: on the default
simulation that was about 250,000 page faults and half a second of kernel
time per round. With the thresholds raised, a round reuses the pages the
round before it freed. The process's peak memory is unchanged (the same
blocks are live at once); it no longer shrinks between rounds.

The ``privfer`` command and a study's worker processes call
:func:`keep_freed_memory` once at start; library callers decide for their own
process.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # <malloc.h>
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))
"""Blocks up to 32 MB (glibc's maximum) from the heap; trim its free top only beyond 1 GiB; grow it 64 MiB at a
time."""


def keep_freed_memory() -> bool:
    """Apply :data:`SETTINGS` to this process's allocator; whether they took (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS)


__all__ = ["SETTINGS", "keep_freed_memory"]
