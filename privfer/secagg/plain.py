"""The plain backend: the same round, summed in the clear. NOT private.

It exists as the baseline that shows what secure aggregation costs (time,
bytes, quantization) and as a test oracle: for the same integer contributions
it returns bit-identical sums to the masking backend. It follows the masking
recipe's dropout semantics (a client dropped at or before "masked_input" is
excluded; at "unmask" it is included), refuses rounds below ``min_inputs``
exactly like the masking clients do, and returns the same
:class:`~privfer.secagg.rounds.AggregationResult` (no transcript, no words:
there is no protocol).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from privfer.secagg.errors import RoundAborted
from privfer.secagg.payload import ArrayLayout, check_example_count, check_metrics, check_update
from privfer.secagg.quantize import ClippingReport
from privfer.secagg.rounds import EXCLUDING_STAGES, AggregationResult, StageTimes, agreed_shapes, check_round_arguments


class PlainConfig(BaseModel):
    """A plain (NOT private) sum of one round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["plain"] = "plain"
    num_clients: int = Field(..., ge=1, le=1_000_000, description="Most clients in one aggregate.")
    encoding: Literal["fixed_point", "integer"] = Field(
        "fixed_point", description="fixed_point: float arrays summed in float64; integer: int64 arrays summed exactly."
    )
    min_inputs: int = Field(1, ge=1, description="A round with fewer included inputs is refused.")
    metrics: tuple[str, ...] = Field((), description="Names of the scalar metrics summed with the update.")
    wire_bits: int = Field(32, ge=8, le=64, description="Bits per value on the wire (for the bytes reported).")

    @model_validator(mode="after")
    def _check(self) -> "PlainConfig":
        if self.min_inputs > self.num_clients:
            raise ValueError(f"min_inputs = {self.min_inputs} exceeds num_clients = {self.num_clients}")
        return self


def aggregate(
    updates: Mapping[int, Sequence[np.ndarray]],
    config: PlainConfig,
    dropouts: Mapping[int, str] | None = None,
    *,
    example_counts: Mapping[int, int] | None = None,
    metrics: Mapping[int, Mapping[str, float]] | None = None,
    round_id: str | None = None,
) -> AggregationResult:
    """The plain counterpart of :func:`privfer.secagg.aggregate` (same arguments and result)."""
    del round_id  # nothing to bind: no messages
    integer = config.encoding == "integer"
    dropouts = check_round_arguments(updates, config.num_clients, dropouts, example_counts, metrics, integer=integer)
    times = StageTimes()
    with times.on_server("unmask"):
        included = [c for c in sorted(updates) if dropouts.get(c) not in EXCLUDING_STAGES]
        if len(included) < max(1, config.min_inputs):
            raise RoundAborted(f"only {len(included)} inputs were included, the minimum is {config.min_inputs}")
        # the same checks as the masking and CKKS clients; an int64 sum of the included values cannot overflow
        shapes = agreed_shapes(updates, dropouts)
        bound = np.iinfo(np.int64).max // config.num_clients
        flat = {c: check_update(updates[c], shapes, integer=integer, bound=bound) for c in included}
        counts = {c: check_example_count(example_counts[c], None) for c in included} \
            if example_counts is not None else {}
        client_metrics = {c: check_metrics(metrics.get(c), config.metrics) for c in included} \
            if metrics is not None else {}
        summed = np.sum([flat[c] for c in included], axis=0)
        total = ArrayLayout(tuple(shapes), config).unflatten(summed)
        count = sum(counts.values()) if example_counts is not None else len(included)
        summed_metrics = {name: float(sum(client_metrics.get(c, {}).get(name, 0.0) for c in included))
                          for name in config.metrics}
    values = int(summed.size)
    bytes_per_client = (values + 1 + len(config.metrics)) * config.wire_bits // 8
    return AggregationResult(
        total=total,
        included=included,
        example_count=count,
        metrics=summed_metrics,
        clipping=ClippingReport(clipped=0, total=len(included) * values),
        error_bound=0.0,
        transcript=None,
        words=None,
        times=times,
        bytes_sent={c: bytes_per_client for c in sorted(updates)},
    )


def round_config(num_clients: int, metrics: tuple[str, ...], *, integer_sum_bound: int | None,
                 min_inputs: int | None, settings: Mapping[str, Any]) -> PlainConfig:
    """The :class:`PlainConfig` of one round: integers summed exactly when ``integer_sum_bound`` is given (the
    wire words then as wide as the run's modulus), else fixed-point floats."""
    integer = integer_sum_bound is not None
    return PlainConfig(num_clients=num_clients, encoding="integer" if integer else "fixed_point",
                       min_inputs=min_inputs or 1, metrics=metrics,
                       wire_bits=settings["modulus_bits"] if integer else 32)

__all__ = ["EXCLUDING_STAGES", "PlainConfig", "aggregate", "round_config"]  # EXCLUDING_STAGES: re-exported from rounds
