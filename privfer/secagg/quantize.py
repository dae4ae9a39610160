"""Fixed-point encoding of float vectors into Z_{2^k} with stochastic rounding.

encode(x) = floor(clip(x, -c, c) * 2^p + u) mod 2^k with u uniform in [0, 1)
(stochastic rounding: unbiased, error below 2^-p per value). Sums of encoded
vectors decode by reading the word as a signed (two's-complement) integer and
dividing by 2^p; :class:`~privfer.secagg.config.SecAggConfig` guarantees the sum
of n clients cannot wrap. Values outside [-c, c] are clipped and *counted* — the
count reaches the caller as a warning and a field of the result, never silently.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from privfer.secagg.prg import expand, word_dtype
from privfer.secagg.randomness import SYSTEM, Randomness


class ClippingWarning(UserWarning):
    """Some values were outside the clipping range and were clipped before aggregation."""


@dataclass
class ClippingReport:
    """How many values were clipped, and the largest magnitude seen (per client or summed)."""

    clipped: int = 0
    total: int = 0
    max_abs: float = 0.0
    clients: dict[int, int] = field(default_factory=dict)

    def add(self, other: "ClippingReport", client: int | None = None) -> None:
        self.clipped += other.clipped
        self.total += other.total
        self.max_abs = max(self.max_abs, other.max_abs)
        if client is not None and other.clipped:
            self.clients[client] = self.clients.get(client, 0) + other.clipped


def rounding_uniforms(count: int, randomness: Randomness = SYSTEM) -> np.ndarray:
    """``count`` uniforms in [0, 1) from the party's randomness (53-bit resolution)."""
    words = expand(randomness.bytes(32), count, 64)
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def encode_fixed_point(
    values: np.ndarray,
    clip: float,
    precision_bits: int,
    modulus_bits: int,
    randomness: Randomness = SYSTEM,
) -> tuple[np.ndarray, ClippingReport]:
    """Float vector -> k-bit words, plus a report of clipped values."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError("updates must be finite (found NaN or infinity)")
    magnitude = np.abs(x)
    outside = int(np.count_nonzero(magnitude > clip))
    report = ClippingReport(clipped=outside, total=x.size, max_abs=float(magnitude.max()) if x.size else 0.0)
    if outside:
        warnings.warn(
            f"{outside} of {x.size} values exceed the clipping range +-{clip:g} (largest {report.max_abs:.4g}) "
            "and were clipped",
            ClippingWarning,
            stacklevel=3,
        )
        x = np.clip(x, -clip, clip)
    scaled = x * (2.0**precision_bits)
    # floor(scaled + u) computed as floor + [u < fraction]: adding u in floating point
    # would round up values already on the grid when scaled is large.
    low = np.floor(scaled)
    integers = low.astype(np.int64) + (rounding_uniforms(x.size, randomness) < (scaled - low))
    return to_words(integers, modulus_bits), report


def encode_integers(values: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Exact integers (e.g. example counts) -> k-bit words."""
    return to_words(np.asarray(values, dtype=np.int64).ravel(), modulus_bits)


def to_words(integers: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Signed integers -> their residues mod 2^k as unsigned words."""
    return integers.astype(np.int64).view(np.uint64).astype(word_dtype(modulus_bits))


def to_signed(words: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Unsigned k-bit words -> the signed integers they represent (two's complement)."""
    if modulus_bits == 64:
        return np.asarray(words, dtype=np.uint64).view(np.int64)
    return np.asarray(words, dtype=np.uint32).view(np.int32).astype(np.int64)


def decode_fixed_point(words: np.ndarray, precision_bits: int, modulus_bits: int) -> np.ndarray:
    """k-bit words (a sum of encodings) -> floats."""
    return to_signed(words, modulus_bits).astype(np.float64) * (2.0**-precision_bits)
