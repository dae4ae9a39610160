"""Packing: a round's arrays, client count and clipped-value digits into CKKS slots, and the fixed-point grid."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from privfer.secagg.errors import OutOfRangeSum
from privfer.secagg.he.config import COUNT_DIGITS, DIGIT, CKKSConfig
from privfer.secagg.payload import ArrayLayout
from privfer.secagg.quantize import ClippingReport, clip_and_report


@dataclass(frozen=True)
class HELayout(ArrayLayout):
    """[update | example count | 1 (client count) | clipped count in 3 base-1024 digits | metrics], chunked by slots."""

    config: CKKSConfig

    @property
    def length(self) -> int:
        return self.update_length + 2 + COUNT_DIGITS + len(self.config.metrics)

    @property
    def chunks(self) -> int:
        return max(1, math.ceil(self.length / self.config.slots))

    def pack(self, arrays: Sequence[np.ndarray], example_count: int, metrics: Mapping[str, float] | None
             ) -> tuple[list[np.ndarray], ClippingReport]:
        config = self.config
        flat, metrics = self.flatten(arrays, example_count, metrics)
        flat, report = clip_and_report(flat.astype(np.float64, copy=False), config.clipping_range)
        metric_values, metric_report = clip_and_report(
            np.array([float(metrics.get(name, 0.0)) for name in config.metrics]), config.metric_range
        )
        report.add(metric_report)
        flat, metric_values = to_grid(flat, config.grid), to_grid(metric_values, config.grid)
        digits = [(report.clipped // DIGIT**i) % DIGIT for i in range(COUNT_DIGITS)]
        vector = np.concatenate([flat, np.array([float(example_count), 1.0, *digits]), metric_values])
        slots = config.slots
        return [vector[i : i + slots] for i in range(0, vector.size, slots)], report

    def check_sum(self, vector: np.ndarray, clients: int) -> None:
        """Refuse (:class:`OutOfRangeSum`) a decrypted sum that ``clients`` in-range inputs cannot produce: each
        update value within clients x (c + 2^-g) (clipping, then rounding up to the grid), the example count in
        0..clients x max_examples, each clipped-count digit in 0..clients x 1023, each metric within
        clients x (m + 2^-g). A client can encrypt anything; the key authority releases nothing beyond this."""
        config, n = self.config, self.update_length
        step = 2.0 ** -config.grid
        ranges = [(vector[:n], config.clipping_range + step, "update value"),
                  (vector[n + 2 + COUNT_DIGITS : self.length], config.metric_range + step, "metric")]
        for values, bound, what in ranges:
            outside = np.flatnonzero(np.abs(values) > clients * bound)
            if outside.size:
                raise OutOfRangeSum(f"the decrypted sum's {what} {int(outside[0])} is beyond what {clients} clients "
                                    "with in-range inputs can produce; nothing is released")
        digits = vector[n + 2 : n + 2 + COUNT_DIGITS]
        if not 0 <= vector[n] <= clients * config.max_examples or np.any(digits < 0) \
                or np.any(digits > clients * (DIGIT - 1)):
            raise OutOfRangeSum(f"the decrypted sum's example or clipping count is beyond what {clients} clients can "
                                "report; nothing is released")

    def unpack(self, vector: np.ndarray) -> tuple[list[np.ndarray], float, float, int, dict[str, float]]:
        n = self.update_length
        digits = np.rint(vector[n + 2 : n + 2 + COUNT_DIGITS]).astype(np.int64)
        clipped = int(sum(int(d) * DIGIT**i for i, d in enumerate(digits)))
        metrics = dict(zip(self.config.metrics, vector[n + 2 + COUNT_DIGITS : self.length].tolist()))
        return self.unflatten(vector[:n]), float(vector[n]), float(vector[n + 1]), clipped, metrics


def to_grid(values: np.ndarray, bits: int) -> np.ndarray:
    """Unbiased stochastic rounding to multiples of 2^-bits (uniforms from the OS CSPRNG)."""
    if values.size == 0:
        return values
    uniforms = np.frombuffer(secrets.token_bytes(8 * values.size), dtype=np.uint64) / 2.0**64
    scale = 2.0**bits
    return np.floor(values * scale + uniforms) / scale
