"""The mask generator: AES-256-CTR keyed with a full 32-byte seed, read as k-bit words.

PRG(seed, m, k) = the first m * k / 8 bytes of the AES-256-CTR keystream under
key = seed and initial counter block = 16 zero bytes, read as m little-endian
unsigned k-bit integers. Each seed is used for exactly one stream (seeds are
derived per round and per pair), so a fixed counter start is safe. Unlike
generators that fold the seed into a 32-bit Mersenne Twister state, every bit
of the 256-bit seed matters.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_ZERO_COUNTER = b"\x00" * 16
_DTYPES = {32: np.dtype("<u4"), 64: np.dtype("<u8")}
_zeros = memoryview(b"")


def _zero_bytes(n: int) -> memoryview:
    """A shared read-only buffer of at least n zero bytes (the plaintext whose encryption is the keystream)."""
    global _zeros
    if len(_zeros) < n:
        _zeros = memoryview(bytes(max(n, 2 * len(_zeros))))
    return _zeros[:n]


def word_dtype(bits: int) -> np.dtype:
    try:
        return _DTYPES[bits]
    except KeyError:
        raise ValueError(f"word size must be 32 or 64 bits, got {bits}") from None


def expand(seed: bytes, count: int, bits: int = 32) -> np.ndarray:
    """``count`` pseudorandom ``bits``-bit words (numpy uint32/uint64) from a 32-byte seed."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if count < 0:
        raise ValueError("count must be >= 0")
    dtype = word_dtype(bits)
    size = count * dtype.itemsize
    out = bytearray(size + 15)  # update_into wants room for one block less a byte
    encryptor = Cipher(algorithms.AES(bytes(seed)), modes.CTR(_ZERO_COUNTER)).encryptor()
    written = encryptor.update_into(_zero_bytes(size), out)
    assert written == size
    return np.frombuffer(out, dtype=dtype, count=count)


class MaskExpander:
    """Expands many seeds of one length into one reused buffer (no allocation or page faults per mask).

    Each call returns a view that the next call overwrites: add it to the
    accumulator before expanding the next seed.
    """

    def __init__(self, count: int, bits: int = 32) -> None:
        self.dtype = word_dtype(bits)
        self.count = count
        self.size = count * self.dtype.itemsize
        self._buffer = bytearray(self.size + 15)
        self._view = np.frombuffer(self._buffer, dtype=self.dtype, count=count)

    def expand(self, seed: bytes) -> np.ndarray:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
        encryptor = Cipher(algorithms.AES(bytes(seed)), modes.CTR(_ZERO_COUNTER)).encryptor()
        encryptor.update_into(_zero_bytes(self.size), self._buffer)
        return self._view


def keystream(seed: bytes, size: int) -> bytes:
    """The raw keystream bytes (the benchmark's floor for mask expansion)."""
    return Cipher(algorithms.AES(bytes(seed)), modes.CTR(_ZERO_COUNTER)).encryptor().update(_zero_bytes(size))
