"""What a client's plaintext vector holds: the update, its example count, its metrics.

Layout (all coordinates in Z_{2^k}):

    [ update values (fixed point, 2^p) | example count | clipped count | metrics (fixed point, 2^q) ]

The example count (the FedAvg weight), the number of values the client had to
clip, and metrics such as loss travel as extra masked coordinates, so the
server learns only their sums — never a single client's count, clipping or loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from privfer.secagg.config import SecAggConfig
from privfer.secagg.errors import InvalidExampleCount, InvalidUpdate, OutOfRangeSum, ShapeMismatch
from privfer.secagg.quantize import (
    ClippingReport,
    decode_fixed_point,
    encode_fixed_point,
    encode_integers,
    to_signed,
)
from privfer.secagg.randomness import SYSTEM, Randomness


def check_update(arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]], *, integer: bool = False,
                 bound: int | None = None) -> np.ndarray:
    """One client's update as one flat vector (float64, or int64 when ``integer``), or a specific
    :class:`~privfer.secagg.errors.InvalidInput`: every backend checks its callers' updates here.

    Only real numbers are summed: complex values (whose imaginary part would be dropped), booleans, text and
    objects are refused, as are NaN and infinity and masked arrays (whose hidden values would be summed); the
    integer encoding takes integer arrays only (2.7 is never truncated to 2), each value within ``bound``
    (checked before any conversion, so nothing wraps).
    """
    if isinstance(arrays, np.ndarray) or not isinstance(arrays, Sequence):
        raise InvalidUpdate(f"an update is a sequence of arrays, got {type(arrays).__name__}")
    values = []
    for index, array in enumerate(arrays):
        if isinstance(array, np.ma.MaskedArray):
            raise InvalidUpdate(f"array {index} is a masked array; its masked values would be summed (fill them)")
        try:
            values.append(np.asarray(array))
        except (ValueError, TypeError) as exc:  # ragged nested lists, objects numpy cannot read
            raise InvalidUpdate(f"array {index} is not an array: {exc}") from None
    got = [v.shape for v in values]
    if len(values) != len(shapes) or any(g != tuple(s) for g, s in zip(got, shapes)):
        raise ShapeMismatch(f"update shapes {got} differ from the agreed {[tuple(s) for s in shapes]}")
    kinds = "iu" if integer else "iuf"
    for index, array in enumerate(values):
        if array.dtype.kind not in kinds:
            expected = "integer" if integer else "real-valued (integer or float)"
            raise InvalidUpdate(f"array {index} has dtype {array.dtype}; updates must be {expected} arrays")
    if integer:
        limit = bound if bound is not None else np.iinfo(np.int64).max
        for array in values:  # compared in the array's own dtype: no wrap, no abs() of the int64 minimum
            if array.size and (array.max() > limit or array.min() < -limit):
                raise InvalidUpdate(f"an integer value exceeds the bound {limit}")
        return np.concatenate([a.astype(np.int64).ravel() for a in values]) if values else np.zeros(0, np.int64)
    flat = np.concatenate([a.astype(np.float64, copy=False).ravel() for a in values]) if values else np.zeros(0)
    if not np.isfinite(flat).all():
        raise InvalidUpdate("updates must be finite (found NaN or infinity)")
    return flat


def check_example_count(count: object, maximum: int | None) -> int:
    """An example count as an int, or :class:`~privfer.secagg.errors.InvalidExampleCount`."""
    if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)):
        raise InvalidExampleCount(f"an example count is an integer, got {count!r} ({type(count).__name__})")
    count = int(count)
    if count < 0 or (maximum is not None and count > maximum):
        allowed = "at least 0" if maximum is None else f"in 0..{maximum}"
        raise InvalidExampleCount(f"example_count {count} must be {allowed}")
    return count


def check_metrics(metrics: Mapping[str, float] | None, configured: Sequence[str]) -> dict[str, float]:
    """A client's metrics: configured names only, values that are finite as float64; else :class:`InvalidUpdate`."""
    if metrics is not None and not isinstance(metrics, Mapping):
        raise InvalidUpdate(f"metrics are a {{name: value}} mapping, got {type(metrics).__name__}")
    metrics = dict(metrics or {})
    unknown = set(metrics) - set(configured)
    if unknown:
        raise InvalidUpdate(f"metrics {sorted(unknown)} are not in the configured {list(configured)}")
    checked = {}
    for name, value in metrics.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise InvalidUpdate(f"metric {name!r} must be a real number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = float("inf")
        if not np.isfinite(number):
            raise InvalidUpdate(f"metric {name!r} must be finite as a float64, got {value!r}")
        checked[name] = number
    return checked


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
        """The update as one float vector (shapes and values checked) and the metrics (names and values checked)."""
        flat = check_update(arrays, self.shapes)
        check_example_count(example_count, self.config.max_examples)
        return flat, check_metrics(metrics, self.config.metrics)

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
            raise InvalidUpdate(f"the update has {self.length} coordinates; max_vector_length is "
                                f"{config.max_vector_length}")
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
        flat = check_update(arrays, self.shapes, integer=True, bound=self.config.integer_sum_bound)
        return encode_integers(flat, self.config.modulus_bits)

    def encode(
        self,
        arrays: Sequence[np.ndarray],
        example_count: int = 1,
        metrics: Mapping[str, float] | None = None,
        randomness: Randomness = SYSTEM,
    ) -> tuple[np.ndarray, ClippingReport]:
        config = self.config
        if self.integer:  # the vector is the integers alone: counts and metrics have no place in it
            check_example_count(example_count, config.max_examples)
            if metrics:
                raise InvalidUpdate("integer encoding carries no metrics (the caller's integers are the whole "
                                    "vector)")
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

    def check_sum(self, words: np.ndarray, included: int) -> None:
        """Refuse (:class:`OutOfRangeSum`) a sum that ``included`` clients sending in-range inputs cannot produce:
        each update word is at most ceil(c 2^p) + 1 in magnitude (clipping, then stochastic rounding), each count
        in 0..max_examples, each clipping count in 0..(values + metrics), each metric word at most
        ceil(m 2^q) + 1; under the integer encoding every coordinate of the sum is within the caller's bound B.
        Checked on the server before anything is decoded or released (SPEC section 6.5)."""
        config = self.config
        signed = to_signed(words, config.modulus_bits)
        if self.integer:
            bound = int(config.integer_sum_bound)  # type: ignore[arg-type]
            _within(signed, -bound, bound, "coordinate", included)
            return
        n = self.update_length
        per_value = math.ceil(config.clipping_range * 2.0 ** config.update_precision_bits) + 1
        _within(signed[:n], -included * per_value, included * per_value, "update value", included)
        _within(signed[n : n + 1], 0, included * config.max_examples, "example count", included)
        _within(signed[n + 1 : n + 2], 0, included * (n + len(config.metrics)), "clipping count", included)
        if config.metrics:
            per_metric = math.ceil(config.metric_range * 2.0 ** config.metric_precision_bits) + 1
            _within(signed[n + 2 :], -included * per_metric, included * per_metric, "metric", included)

    def error_bound(self, clients: int) -> float:
        """Largest decoding error of a sum of ``clients`` updates: stochastic rounding adds < 2^-p each."""
        if self.integer:
            return 0.0  # integers are summed exactly
        return clients * 2.0 ** -self.config.update_precision_bits


def _within(values: np.ndarray, low: int, high: int, what: str, included: int) -> None:
    outside = np.flatnonzero((values < low) | (values > high))
    if outside.size:
        index = int(outside[0])
        raise OutOfRangeSum(f"the unmasked sum's {what} {index} is {int(values[index])} (in fixed-point units), "
                            f"outside [{low}, {high}], the most {included} clients with in-range inputs can "
                            f"produce ({outside.size} such coordinates): a client sent a forged input; the round "
                            "is refused")
