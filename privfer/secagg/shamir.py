"""t-of-n Shamir secret sharing of 32-byte secrets over GF(2^31 - 1), vectorized with numpy.

A 32-byte secret is read as a little-endian 256-bit integer and cut into nine
30-bit chunks; each chunk is an element of the prime field F_p, p = 2^31 - 1,
shared with its own independent random polynomial of degree t - 1 (so each
chunk, and hence the whole secret, is information-theoretically hidden from
fewer than t holders). The share for holder x (a client id, 1 <= x < p) is the
nine polynomial values at x, encoded as nine 4-byte little-endian words (36
bytes). Products of two field elements stay below 2^62, so all arithmetic is
exact in uint64.
"""

from __future__ import annotations

import numpy as np

from privfer.secagg.errors import NotEnoughShares
from privfer.secagg.randomness import SYSTEM, Randomness

PRIME = (1 << 31) - 1
CHUNK_BITS = 30
CHUNKS = 9  # 9 x 30 = 270 >= 256 bits
SECRET_BYTES = 32
SHARE_BYTES = CHUNKS * 4
_P = np.uint64(PRIME)


def secret_to_chunks(secret: bytes) -> np.ndarray:
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    value = int.from_bytes(secret, "little")
    mask = (1 << CHUNK_BITS) - 1
    return np.array([(value >> (CHUNK_BITS * i)) & mask for i in range(CHUNKS)], dtype=np.uint64)


def chunks_to_secret(chunks: np.ndarray) -> bytes:
    value = 0
    for i, chunk in enumerate(np.asarray(chunks, dtype=np.uint64).tolist()):
        if chunk >= 1 << CHUNK_BITS:
            raise NotEnoughShares("the shares are inconsistent: a reconstructed chunk is out of range")
        value |= int(chunk) << (CHUNK_BITS * i)
    if value >> (8 * SECRET_BYTES):
        raise NotEnoughShares("the shares are inconsistent: the reconstructed secret is longer than 32 bytes")
    return value.to_bytes(SECRET_BYTES, "little")


def random_field_elements(shape: tuple[int, ...], randomness: Randomness = SYSTEM) -> np.ndarray:
    """Uniform elements of F_p (rejection sampling over 31-bit words)."""
    count = int(np.prod(shape))
    out = np.empty(0, dtype=np.uint64)
    while out.size < count:
        words = np.frombuffer(randomness.bytes(4 * (count - out.size + 8)), dtype="<u4").astype(np.uint64)
        words &= np.uint64(PRIME)  # 31 bits
        out = np.concatenate([out, words[words < _P]])
    return out[:count].reshape(shape)


def _check_holders(xs: np.ndarray) -> None:
    if xs.size and (xs.min() < 1 or xs.max() >= PRIME):
        raise ValueError(f"holder ids must be in 1..{PRIME - 1}")
    if np.unique(xs).size != xs.size:
        raise ValueError("holder ids must be distinct")


def split(secrets: list[bytes], holders: list[int], threshold: int, randomness: Randomness = SYSTEM,
          coefficients: np.ndarray | None = None) -> np.ndarray:
    """Shares of several secrets: uint64 array (holders, secrets, CHUNKS).

    ``coefficients`` (threshold - 1, secrets, CHUNKS) fixes the random polynomial
    coefficients, for known-answer vectors only.
    """
    xs = np.asarray(holders, dtype=np.uint64)
    _check_holders(xs)
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold must be between 1 and {len(holders)} holders, got {threshold}")
    constant = np.stack([secret_to_chunks(s) for s in secrets]) if secrets else np.zeros((0, CHUNKS), np.uint64)
    if coefficients is None:
        coefficients = random_field_elements((threshold - 1, len(secrets), CHUNKS), randomness)
    coefficients = np.asarray(coefficients, dtype=np.uint64)
    if coefficients.shape != (threshold - 1, len(secrets), CHUNKS):
        raise ValueError(f"coefficients must have shape {(threshold - 1, len(secrets), CHUNKS)}")
    x = xs[:, None, None]
    acc = np.zeros((len(xs), len(secrets), CHUNKS), dtype=np.uint64)
    for c in coefficients[::-1]:  # Horner: highest degree first
        acc = (acc + c[None]) * x % _P
    return (acc + constant[None]) % _P


def lagrange_at_zero(holders: list[int] | np.ndarray) -> np.ndarray:
    """Coefficients l_i with f(0) = sum_i l_i f(x_i) for polynomials of degree < len(holders)."""
    xs = np.asarray(holders, dtype=np.uint64)
    _check_holders(xs)
    numerator = np.ones(xs.size, dtype=np.uint64)
    denominator = np.ones(xs.size, dtype=np.uint64)
    for j in range(xs.size):
        factor = (xs[j] + _P - xs) % _P  # x_j - x_i
        factor[j] = 1
        xj = np.full(xs.size, xs[j], dtype=np.uint64)
        xj[j] = 1
        numerator = numerator * xj % _P
        denominator = denominator * factor % _P
    inverses = np.array([pow(int(d), PRIME - 2, PRIME) for d in denominator.tolist()], dtype=np.uint64)
    return numerator * inverses % _P


def reconstruct(holders: list[int], shares: np.ndarray, threshold: int) -> list[bytes]:
    """Secrets from the shares of ``holders`` (shape (holders, secrets, CHUNKS)); uses the first ``threshold``."""
    if len(holders) < threshold:
        raise NotEnoughShares(f"{len(holders)} shares given, the threshold is {threshold}")
    xs = list(holders)[:threshold]
    values = np.asarray(shares, dtype=np.uint64)[:threshold] % _P
    weights = lagrange_at_zero(xs)
    chunks = (values * weights[:, None, None] % _P).sum(axis=0) % _P
    return [chunks_to_secret(row) for row in chunks]


def share_to_bytes(share: np.ndarray) -> bytes:
    return np.asarray(share, dtype="<u4").tobytes()


def share_from_bytes(raw: bytes) -> np.ndarray:
    if len(raw) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(raw)}")
    values = np.frombuffer(raw, dtype="<u4").astype(np.uint64)
    if np.any(values >= _P):
        raise ValueError("a share word is not a field element")
    return values
