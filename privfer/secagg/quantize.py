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
from dataclasses import dataclass

import numpy as np

from privfer.secagg.errors import InvalidUpdate
from privfer.secagg.prg import expand, word_dtype
from privfer.secagg.randomness import SYSTEM, Randomness


class ClippingWarning(UserWarning):
    """Some values were outside the clipping range and were clipped before aggregation."""


@dataclass
class ClippingReport:
    """How many of how many values were clipped.

    A client's own report also has the largest magnitude it saw (``max_abs``);
    the report of an aggregate has only the securely summed count (a masked
    coordinate), so it reveals no single client's clipping.
    """

    clipped: int = 0
    total: int = 0
    max_abs: float | None = None

    def add(self, other: "ClippingReport") -> None:
        self.clipped += other.clipped
        self.total += other.total
        if other.max_abs is not None:
            self.max_abs = max(self.max_abs or 0.0, other.max_abs)


def rounding_words(count: int, randomness: Randomness = SYSTEM) -> np.ndarray:
    """``count`` uniform 32-bit words expanded from 32 bytes of the party's randomness.

    Rounding up happens when word < fraction * 2^32: a 2^-32 grid biases a
    rounding probability by less than 2^-32, far below the 2^-p step itself.
    """
    return expand(randomness.bytes(32), count, 32)


def clip_and_report(x: np.ndarray, clip: float) -> tuple[np.ndarray, ClippingReport]:
    """Clip to [-clip, clip], counting (and warning about) every value that had to move."""
    max_abs = float(np.max(np.abs(x))) if x.size else 0.0
    if not np.isfinite(max_abs):
        raise InvalidUpdate("updates must be finite (found NaN or infinity)")
    report = ClippingReport(clipped=0, total=x.size, max_abs=max_abs)
    if max_abs > clip:
        report.clipped = int(np.count_nonzero(np.abs(x) > clip))
        warnings.warn(
            f"{report.clipped} of {x.size} values exceed the clipping range +-{clip:g} (largest {max_abs:.4g}) "
            "and were clipped",
            ClippingWarning,
            stacklevel=4,
        )
        x = np.clip(x, -clip, clip)
    return x, report


def encode_fixed_point(
    values: np.ndarray,
    clip: float,
    precision_bits: int,
    modulus_bits: int,
    randomness: Randomness = SYSTEM,
) -> tuple[np.ndarray, ClippingReport]:
    """Float vector -> k-bit words, plus a report of clipped values."""
    x = np.asarray(values).ravel()
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    if x.size == 0:
        return np.zeros(0, dtype=word_dtype(modulus_bits)), ClippingReport()
    x, report = clip_and_report(x, clip)
    scaled = np.multiply(x, 2.0**precision_bits, dtype=np.float64)
    low = np.floor(scaled)
    # floor(scaled + u) computed as floor + [u < fraction]: adding u in floating point
    # would round up values already on the grid when scaled is large.
    scaled -= low
    scaled *= 2.0**32
    integers = low.astype(np.int64)
    integers += rounding_words(x.size, randomness) < scaled
    return to_words(integers, modulus_bits), report


def encode_integers(values: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Exact integers (e.g. example counts) -> k-bit words."""
    return to_words(np.asarray(values, dtype=np.int64).ravel(), modulus_bits)


def to_words(integers: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Signed integers -> their residues mod 2^k as unsigned words."""
    integers = np.asarray(integers, dtype=np.int64)
    return integers.view(np.uint64).astype(word_dtype(modulus_bits), copy=modulus_bits != 64)


def to_signed(words: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Unsigned k-bit words -> the signed integers they represent (two's complement)."""
    if modulus_bits == 64:
        return np.asarray(words, dtype=np.uint64).view(np.int64)
    return np.asarray(words, dtype=np.uint32).view(np.int32).astype(np.int64)


def decode_fixed_point(words: np.ndarray, precision_bits: int, modulus_bits: int) -> np.ndarray:
    """k-bit words (a sum of encodings) -> floats."""
    return to_signed(words, modulus_bits).astype(np.float64) * (2.0**-precision_bits)
