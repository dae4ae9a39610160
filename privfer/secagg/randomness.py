"""Where each party's randomness comes from: the OS CSPRNG, or (for test vectors only) a fixed seed.

Keys, self-mask seeds, AES-GCM nonces, Shamir coefficients and stochastic
rounding all draw from one :class:`Randomness` object per party, so a protocol
run can be replayed exactly for known-answer vectors while production runs use
``os.urandom`` and nothing else.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


class Randomness:
    """Cryptographic randomness from the operating system's CSPRNG (the default)."""

    deterministic = False

    def bytes(self, n: int) -> bytes:
        return os.urandom(n)


class InsecureDeterministicRandomness(Randomness):
    """A fixed AES-256-CTR stream keyed by ``seed``: for known-answer test vectors ONLY.

    Anyone who knows the seed knows every key and mask of the party using it.
    """

    deterministic = True

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("the deterministic seed must be 32 bytes")
        self._stream = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()

    def bytes(self, n: int) -> bytes:
        return self._stream.update(b"\x00" * n)


SYSTEM = Randomness()
