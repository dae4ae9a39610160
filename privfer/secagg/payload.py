"""What a client's plaintext vector holds: the update, its example count, its metrics.

Layout (all coordinates in Z_{2^k}):

    [ update values (fixed point, 2^p) | example count | clipped count | metrics (fixed point, 2^q) ]

The example count (the FedAvg weight), the number of values the client had to
clip, and metrics such as loss travel as extra masked coordinates, so the
server learns only their sums — never a single client's count, clipping or loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from privfer.secagg.config import SecAggConfig
from privfer.secagg.quantize import (
    ClippingReport,
    decode_fixed_point,
    encode_fixed_point,
    encode_integers,
    to_signed,
)
from privfer.secagg.randomness import SYSTEM, Randomness


class ShapeMismatch(ValueError):
    """An update's arrays do not match the agreed shapes."""


@dataclass(frozen=True)
class Decoded:
    arrays: list[np.ndarray]
    example_count: int
    clipped: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class ArrayLayout:
    """The agreed shapes of an update (public to every party) and the extras' config.

    Shared by the masking and CKKS backends: flattening with shape checks,
    restoring shapes, and validating the example count and metric names.
    """

    shapes: tuple[tuple[int, ...], ...]
    config: Any

    @classmethod
    def for_arrays(cls, arrays: Sequence[np.ndarray], config: Any) -> "ArrayLayout":
        return cls(tuple(tuple(int(s) for s in np.shape(a)) for a in arrays), config)

    @property
    def update_length(self) -> int:
        return int(sum(int(np.prod(shape)) for shape in self.shapes))

    def flatten(
        self, arrays: Sequence[np.ndarray], example_count: int, metrics: Mapping[str, float] | None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """The update as one float vector (shapes checked) and the metrics (names checked)."""
        if len(arrays) != len(self.shapes) or any(np.shape(a) != s for a, s in zip(arrays, self.shapes)):
            raise ShapeMismatch(
                f"update shapes {[np.shape(a) for a in arrays]} differ from the agreed {list(self.shapes)}"
            )
        if not 0 <= int(example_count) <= self.config.max_examples:
            raise ValueError(f"example_count {example_count} is outside 0..{self.config.max_examples}")
        metrics = dict(metrics or {})
        unknown = set(metrics) - set(self.config.metrics)
        if unknown:
            raise ValueError(f"metrics {sorted(unknown)} are not in the configured {list(self.config.metrics)}")
        flat = np.concatenate([np.asarray(a).ravel() for a in arrays]) if arrays else np.zeros(0)
        return (flat if flat.dtype.kind == "f" else flat.astype(np.float64)), metrics

    def unflatten(self, flat: np.ndarray) -> list[np.ndarray]:
        arrays, at = [], 0
        for shape in self.shapes:
            size = int(np.prod(shape))
            arrays.append(flat[at : at + size].reshape(shape))
            at += size
        return arrays


@dataclass(frozen=True)
class PayloadLayout(ArrayLayout):
    """The masking backend's plaintext vector: fixed-point update, integer count, fixed-point metrics."""

    config: SecAggConfig

    def __post_init__(self) -> None:
        config = self.config
        if self.length > config.max_vector_length:
            raise ValueError(f"the update has {self.length} coordinates; max_vector_length is {config.max_vector_length}")
        if self.integer:
            return
        limit = 2 ** (config.modulus_bits - 1) - 1
        if config.num_clients * (self.update_length + len(config.metrics)) > limit:
            raise ValueError(
                f"clipped-value counts of {config.num_clients} clients x {self.update_length} values could wrap "
                f"2^{config.modulus_bits}; use modulus_bits=64"
            )

    @property
    def integer(self) -> bool:
        """The caller's integers, nothing added (``encoding="integer"``)."""
        return self.config.encoding == "integer"

    @property
    def length(self) -> int:
        if self.integer:
            return self.update_length
        return self.update_length + 2 + len(self.config.metrics)

    def encode_integer_arrays(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Integer arrays (each |value| <= the config's sum bound) -> words mod 2^k; the vector is just them."""
        if len(arrays) != len(self.shapes) or any(np.shape(a) != s for a, s in zip(arrays, self.shapes)):
            raise ShapeMismatch(
                f"update shapes {[np.shape(a) for a in arrays]} differ from the agreed {list(self.shapes)}"
            )
        if any(np.asarray(a).dtype.kind not in "iu" for a in arrays):
            raise TypeError("integer encoding takes integer arrays (the caller encodes its values)")
        flat = np.concatenate([np.asarray(a, dtype=np.int64).ravel() for a in arrays]) if arrays else np.zeros(0, np.int64)
        bound = self.config.integer_sum_bound
        if flat.size and int(np.abs(flat).max()) > bound:
            raise ValueError(f"an integer value exceeds the round's sum bound {bound}")
        return encode_integers(flat, self.config.modulus_bits)

    def encode(
        self,
        arrays: Sequence[np.ndarray],
        example_count: int = 1,
        metrics: Mapping[str, float] | None = None,
        randomness: Randomness = SYSTEM,
    ) -> tuple[np.ndarray, ClippingReport]:
        config = self.config
        if self.integer:
            return self.encode_integer_arrays(arrays), ClippingReport(total=self.update_length)
        flat, metrics = self.flatten(arrays, example_count, metrics)
        update, report = encode_fixed_point(
            flat, config.clipping_range, config.update_precision_bits, config.modulus_bits, randomness
        )
        metric_words = np.zeros(0, dtype=update.dtype)
        if config.metrics:
            values = np.array([float(metrics.get(name, 0.0)) for name in config.metrics])
            metric_words, metric_report = encode_fixed_point(
                values, config.metric_range, config.metric_precision_bits, config.modulus_bits, randomness
            )
            report.add(metric_report)
        counts = encode_integers(np.array([int(example_count), report.clipped]), config.modulus_bits)
        return np.concatenate([update, counts, metric_words]), report

    def decode(self, words: np.ndarray) -> Decoded:
        config = self.config
        if words.shape != (self.length,):
            raise ShapeMismatch(f"expected {self.length} words, got {words.shape}")
        if self.integer:
            return Decoded(self.unflatten(to_signed(words, config.modulus_bits)), 0, 0, {})
        n = self.update_length
        arrays = self.unflatten(decode_fixed_point(words[:n], config.update_precision_bits, config.modulus_bits))
        count, clipped = (int(v) for v in to_signed(words[n : n + 2], config.modulus_bits))
        metric_values = decode_fixed_point(words[n + 2 :], config.metric_precision_bits, config.modulus_bits)
        return Decoded(arrays, count, clipped, dict(zip(config.metrics, metric_values.tolist())))

    def error_bound(self, clients: int) -> float:
        """Largest decoding error of a sum of ``clients`` updates: stochastic rounding adds < 2^-p each."""
        if self.integer:
            return 0.0  # integers are summed exactly
        return clients * 2.0 ** -self.config.update_precision_bits
