"""One round's aggregation of client updates: masking SecAgg, CKKS, or a plain (NOT private) sum.

Bridges torch state dictionaries and :func:`privfer.secagg.aggregate`, which
takes lists of numpy arrays and runs whichever backend the round's config
names (every backend returns the same result type; nothing here branches on it). Each client submits ``weight x update``
with its weight (example count) as the masked count coordinate and its
training loss as a masked metric, so the server learns only sums. The
``plain`` backend (:mod:`privfer.secagg.plain`) sums in float64 in the clear
and exists as the baseline that shows what secure aggregation costs; results
label it not private.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from privfer.config import AggregationConfig
from privfer.secagg import aggregate
from privfer.secagg.errors import RoundAborted, SecAggError
from privfer.secagg.hosts import default_processes
from privfer.secagg.quantize import ClippingWarning
from privfer.secagg.statements import NO_CONTEXT, context_digest


def round_context(state: Mapping[str, torch.Tensor], plan: object | None = None) -> bytes:
    """The digest every client of a round signs under active security: the model it trains from (names, dtypes,
    shapes and bytes, in name order) and the round's DP plan. Two clients given different models or plans sign
    different statements, and no share is revealed unless enough members signed the same one."""
    parts = []
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        parts.append(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode("utf-8"))
        parts.append(tensor.numpy().tobytes())
    if plan is not None:
        parts.append(json.dumps(plan.to_dict(), sort_keys=True, default=str).encode("utf-8"))  # type: ignore[attr-defined]
    return context_digest(*parts)


@dataclass
class RoundSum:
    """The aggregate of one round, as the server learns it."""

    weighted_sum: dict[str, torch.Tensor]
    total_weight: float
    loss_sum: float
    included: list[int]
    aborted: str | None = None  # why the round produced no aggregate
    clipped: int = 0
    error_bound: float = 0.0
    seconds: float = 0.0
    bytes_sent: dict[int, int] = field(default_factory=dict)


def sum_updates(
    updates: Mapping[int, dict[str, torch.Tensor]],
    weights: Mapping[int, int],
    losses: Mapping[int, float] | None,
    config: AggregationConfig,
    *,
    dropouts: Mapping[int, str] | None = None,
    round_id: str,
    weight_scale: float = 1.0,
    context: bytes = NO_CONTEXT,
) -> RoundSum:
    """Sum ``weight x update`` over the clients, with ``dropouts`` (client -> stage it never completes).

    Each client masks ``(weight / weight_scale) x update``: with ``weight_scale``
    a public bound on the weights (the largest client's record count), the
    masked values stay within the update's own range, so the quantization's
    clipping range bounds the update, not the update times a record count.
    The returned ``weighted_sum`` is scaled back: sum(weight x update).
    """
    if weight_scale <= 0:
        raise ValueError("weight_scale must be positive")
    dropouts = dict(dropouts or {})
    clients = sorted(updates)
    names = list(next(iter(updates.values())).keys())
    shapes = {name: tuple(updates[clients[0]][name].shape) for name in names}
    arrays = {
        cid: [((weights[cid] / weight_scale) * updates[cid][name].detach().double()).numpy() for name in names]
        for cid in clients
    }
    start = time.perf_counter()
    round_config = config.round_config(len(clients), metrics=("loss",) if losses is not None else ())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ClippingWarning)
            result = aggregate(
                {c: arrays[c] for c in clients},
                round_config,
                dropouts,
                example_counts={c: int(weights[c]) for c in clients},
                metrics={c: {"loss": float(losses[c])} for c in clients} if losses is not None else None,
                round_id=round_id,
                context=context,
                processes=client_processes(len(clients)),
            )
    except RoundAborted as exc:
        return RoundSum({}, 0.0, 0.0, [], aborted=str(exc), seconds=time.perf_counter() - start)
    except SecAggError as exc:  # in-process, any other protocol failure is a bug worth stopping for
        raise RuntimeError(f"secure aggregation failed in round {round_id}: {exc}") from exc
    del caught  # clipping is reported in the result
    return _result(
        names,
        shapes,
        result.total,
        float(result.example_count),
        float(result.metrics.get("loss", 0.0)),
        list(result.included),
        time.perf_counter() - start,
        int(result.clipping.clipped),
        float(result.error_bound),
        dict(result.bytes_sent),
        weight_scale,
    )


def _result(names, shapes, total, weight, loss, included, seconds, clipped, bound, bytes_sent, scale) -> RoundSum:
    summed = {
        name: torch.from_numpy(scale * np.asarray(array, dtype=np.float64).reshape(shapes[name]))
        for name, array in zip(names, total)
    }
    return RoundSum(summed, weight, loss, included, None, clipped, bound * scale, seconds, bytes_sent)


def client_processes(clients: int) -> int:
    """How many processes a simulated round's clients run in (:mod:`privfer.secagg.hosts`): one per torch thread
    the run may use (``training.torch_threads``), at most one per core and per 16 clients. The sum, the included
    clients and every message's content are the same for any count."""
    return min(torch.get_num_threads(), default_processes(clients))


@dataclass
class IntegerRoundSum:
    """The exact integer sum of one round's contributions, as the server learns it."""

    total: np.ndarray  # int64, flat
    included: list[int]
    aborted: str | None = None
    seconds: float = 0.0
    bytes_sent: dict[int, int] = field(default_factory=dict)


def sum_integer_contributions(
    contributions: Mapping[int, np.ndarray],
    dropouts: Mapping[int, str] | None,
    config: AggregationConfig,
    plan,
    *,
    round_id: str,
    context: bytes = NO_CONTEXT,
) -> IntegerRoundSum:
    """Sum already-encoded integer vectors (distributed DP's contributions) over the clients that stay.

    ``plan`` gives the modulus, the bound on any coordinate of the sum and the
    minimum number of included inputs (clients refuse to unmask below it). The
    ``plain`` backend adds the integers in the clear (NOT private: a test
    baseline); CKKS is refused by the config (its approximate decryption is not an exact sum).
    """
    dropouts = dict(dropouts or {})
    clients = sorted(contributions)
    start = time.perf_counter()
    round_config = config.round_config(len(clients), integer_sum_bound=plan.sum_bound, min_inputs=plan.min_inputs)
    if getattr(round_config, "modulus_bits", plan.modulus_bits) != plan.modulus_bits:
        raise ValueError(f"the plan is for 2^{plan.modulus_bits}, the aggregation for 2^{round_config.modulus_bits}")
    try:
        result = aggregate({c: [np.asarray(contributions[c], dtype=np.int64)] for c in clients}, round_config,
                           dropouts, round_id=round_id, context=context, processes=client_processes(len(clients)))
    except RoundAborted as exc:
        return IntegerRoundSum(np.zeros(0, np.int64), [], str(exc), time.perf_counter() - start)
    except SecAggError as exc:
        raise RuntimeError(f"secure aggregation failed in round {round_id}: {exc}") from exc
    return IntegerRoundSum(np.asarray(result.total[0], dtype=np.int64), list(result.included), None,
                           time.perf_counter() - start, dict(result.bytes_sent))


__all__ = ["IntegerRoundSum", "RoundSum", "client_processes", "round_context", "sum_integer_contributions",
           "sum_updates"]
