"""privfer's processes keep the memory a round frees for the next round (privfer.fl.allocator)."""

from __future__ import annotations

import subprocess
import sys

import pytest

ROUNDS = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from privfer.fl.allocator import keep_freed_memory
    assert keep_freed_memory()
def round_():
    blocks = [np.ones(1 << 20) for _ in range(3)]  # 3 x 8 MB, freed together as a round's tensors are
    del blocks
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_round_after_the_first_faults_no_pages_in_when_freed_memory_is_kept():
    faults = {mode: int(subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True,
                                       check=True, timeout=120).stdout) for mode in ("default", "keep")}
    # glibc's default trims the freed 24 MB back to the OS: each later round faults ~6,000 pages in again
    assert faults["default"] > 10 * 2048 // 3 and faults["keep"] < 100, faults
