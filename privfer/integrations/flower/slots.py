"""The agreed layout of what a node returns: which arrays, in which order (ArraySlot and its helpers)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from privfer.integrations.flower.common import RecordDict
from privfer.secagg.payload import ShapeMismatch


# --------------------------------------------------------------------------------------------------------------------
# The agreed layout of what a node returns: which arrays (record key, name, shape, dtype), in which order.
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArraySlot:
    record: str
    name: str
    shape: tuple[int, ...]
    dtype: str


def slots_of(content: RecordDict) -> list[ArraySlot]:
    return [
        ArraySlot(record_key, name, tuple(int(d) for d in array.shape), str(array.dtype))
        for record_key, record in content.array_records.items()
        for name, array in record.items()
    ]


def _slots_to_json(slots: Sequence[ArraySlot]) -> str:
    return json.dumps([[s.record, s.name, list(s.shape), s.dtype] for s in slots])


def _slots_from_json(text: str) -> list[ArraySlot]:
    return [ArraySlot(str(r), str(n), tuple(int(d) for d in shape), str(dt)) for r, n, shape, dt in json.loads(text)]


def _arrays_in(content: RecordDict, slots: Sequence[ArraySlot], what: str, exact: bool = True) -> list[np.ndarray]:
    """The arrays named by ``slots`` (as float64); ``exact``: and no others."""
    present = {(s.record, s.name): s.shape for s in slots_of(content)}
    expected = {(s.record, s.name): s.shape for s in slots}
    if (present if exact else {k: v for k, v in present.items() if k in expected}) != expected:
        raise ShapeMismatch(
            f"{what} holds arrays {sorted(present.items())[:6]}, but the round agreed on {sorted(expected.items())[:6]}"
        )
    return [np.asarray(content[s.record][s.name].numpy(), dtype=np.float64) for s in slots]


def _metrics_in(content: RecordDict) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for record in content.metric_records.values():
        merged.update(record)
    return merged


def content_bytes(content: RecordDict) -> bytes:
    """A message's whole content — every array, config and metric record — as Flower's protobuf, serialized
    deterministically (map keys sorted): equal contents give equal bytes on the grid and on the node."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString(deterministic=True)


def round_context(content: RecordDict, slots_json: str, weight_key: str, plan_json: str) -> bytes:
    """What the nodes of an active-security round sign besides the survivors: the digest of everything the
    ClientApp is given — the strategy's whole message (model arrays, the config record with its learning rate and
    epochs, any metrics), for train and evaluate alike — and of the round's layout, weight key and DP plan. The
    grid computes it from what it sent, each node from what it received: a node given another model or another
    config signs another statement."""
    from privfer.secagg.statements import context_digest

    return context_digest(content_bytes(content), slots_json.encode("utf-8"), weight_key.encode("utf-8"),
                          plan_json.encode("utf-8"))
