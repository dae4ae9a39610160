"""What a secure round hands back: the operator's :class:`RoundReport`, and the strategy's one reply that stands
for every included node.

Without DP it is the example-weighted mean update applied to the arrays the
nodes received, with the securely averaged metrics. Under distributed DP it
is decoded through :mod:`privfer.privacy.recipe`, as any other FL loop would,
and weighted by the included nodes (never by a count): person level, the
received arrays plus the mean clipped update over the PUBLIC denominator
(participation x included nodes); record level, one gradient step — the
received arrays minus ``server_lr`` x the decoded gradient sum over
sample_rate x the included nodes' records (the last, exact word of the sum).
Neither keeps optimizer state: the strategy's own server optimizer (Flower's
FedAdam, FedYogi, ...) is the only one, applied to what the reply moved
(FedAvg takes the reply as it is).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from privfer.integrations.flower.common import Array, ArrayRecord, MetricRecord, RecordDict
from privfer.integrations.flower.slots import ArraySlot
from privfer.privacy import recipe
from privfer.secagg.errors import RoundAborted


@dataclass
class RoundReport:
    """What one securely aggregated exchange did (one per protected ``send_and_receive``)."""

    message_type: str
    group_id: str
    round_id: str
    sampled: list[int]
    included: list[int] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)  # node id -> "stage: reason"
    example_count: int = 0
    clipped: int = 0
    aborted: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    privfer_bytes: int = 0  # privfer's protocol messages both ways (Flower's envelopes not counted)
    security: str = "semi_honest"  # "active": enrolled nodes, signed rosters, the consistency check
    client_ids: dict[int, int] = field(default_factory=dict)  # node id -> its protocol id (member id when active)


def _content(slots: Sequence[ArraySlot], values: Sequence[np.ndarray]) -> RecordDict:
    """The arrays in their records, each as its slot's dtype."""
    content = RecordDict()
    for slot, value in zip(slots, values):
        if slot.record not in content.array_records:
            content[slot.record] = ArrayRecord()
        content[slot.record][slot.name] = Array(np.ascontiguousarray(value.astype(slot.dtype)))
    return content


def aggregated_reply(decoded: Any, slots: Sequence[ArraySlot], received: Sequence[np.ndarray], max_examples: int,
                     weighted_by_key: str) -> RecordDict:
    """No DP: the received arrays plus the example-weighted mean update (integer slots rounded), the included
    examples as the weight and the securely averaged metrics."""
    total = decoded.example_count
    factor = max_examples / total
    values = []
    for slot, before, summed in zip(slots, received, decoded.arrays):
        value = before + summed * factor
        values.append(np.rint(value) if np.dtype(slot.dtype).kind in "iub" else value)
    content = _content(slots, values)
    metrics: dict[str, int | float] = {weighted_by_key: int(total)}
    metrics.update({name: float(value) * factor for name, value in decoded.metrics.items()})
    content["metrics"] = MetricRecord(metrics)
    return content


def decoded_records(decoded: Any, dp: Any) -> int | None:
    """Record level: the included nodes' records, the sum's last (exact) word; None at person level."""
    return int(np.asarray(decoded.arrays[-1]).ravel()[0]) if dp.unit == "record" else None


def private_reply(decoded: Any, slots: Sequence[ArraySlot], received: Sequence[np.ndarray], dp: Any, plan: Any,
                  included: int, records: int | None, weighted_by_key: str) -> RecordDict:
    """Distributed DP (see the module docstring): the reply's content. ``records``: :func:`decoded_records`."""
    record_level = records is not None
    words = decoded.arrays[:-1] if record_level else decoded.arrays
    flat = np.concatenate([np.asarray(a, dtype=np.int64).ravel() for a in words])
    slots = slots[:-1] if record_level else slots
    if records is not None:  # one DP-SGD step: the noisy sum over the public expected batch
        if records < 1:
            raise RoundAborted("the included nodes hold no records")
        step = -dp.server_lr * recipe.mean_gradient(flat, plan, records)
    else:
        step = recipe.mean_update(flat, plan, included)
    values, at = [], 0
    for slot, before in zip(slots, received):
        size = int(np.prod(slot.shape, dtype=np.int64))
        values.append(before + step[at : at + size].reshape(slot.shape))
        at += size
    content = _content(slots, values)
    content["metrics"] = MetricRecord({weighted_by_key: included})
    return content


__all__ = ["RoundReport", "aggregated_reply", "decoded_records", "private_reply"]
