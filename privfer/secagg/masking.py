"""The masking backend's recipe: a whole pairwise-masking round (SecAgg / SecAgg+, active or semi-honest
security) in process, every message through its byte encoding, clients dropping out at the stages named."""

from __future__ import annotations

import secrets
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from privfer.secagg.client import SecAggClient
from privfer.secagg.config import SecAggConfig, make_config
from privfer.secagg.hosts import ClientHosts
from privfer.secagg.identity import Enrollment, enroll_in_process
from privfer.secagg.payload import PayloadLayout
from privfer.secagg.quantize import ClippingReport, ClippingWarning
from privfer.secagg.randomness import SYSTEM, Randomness
from privfer.secagg.errors import InvalidRoundArguments
from privfer.secagg.rounds import (
    STAGES,
    AggregationResult,
    Stage,
    StageTimes,
    agreed_shapes,
    check_round_arguments,
    warn_clipping,
)
from privfer.secagg.server import SecAggServer
from privfer.secagg.stages import round_stages
from privfer.secagg.statements import NO_CONTEXT


def aggregate(
    updates: Mapping[int, Sequence[np.ndarray]],
    config: SecAggConfig,
    dropouts: Mapping[int, Stage] | None = None,
    *,
    example_counts: Mapping[int, int] | None = None,
    metrics: Mapping[int, Mapping[str, float]] | None = None,
    round_id: str | None = None,
    randomness: Callable[[int], Randomness] | None = None,
    enrollments: Mapping[int, Enrollment] | None = None,
    context: bytes = NO_CONTEXT,
    processes: int = 1,
) -> AggregationResult:
    """Securely sum ``updates`` with the pairwise-masking protocol; the arguments are
    :func:`privfer.secagg.aggregate`'s, which documents them (every option applies here)."""
    if not isinstance(config, SecAggConfig):
        raise TypeError(f"the masking recipe runs a SecAggConfig, got {type(config).__name__}")
    dropouts = check_round_arguments(updates, config.num_clients, dropouts, example_counts, metrics,
                                     integer=config.encoding == "integer")
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise InvalidRoundArguments(f"processes must be an integer >= 1, got {processes!r}")
    layout = PayloadLayout(tuple(agreed_shapes(updates, dropouts)), config)
    round_id = round_id or secrets.token_hex(8)
    make_randomness = randomness or (lambda _client: SYSTEM)
    active_security = config.security == "active"
    certificate = None
    if active_security:
        if enrollments is None:
            enrollments = enroll_in_process(sorted(updates))
        missing = sorted(set(updates) - set(enrollments))
        if missing:
            raise InvalidRoundArguments(f"enrollments has no identity for clients {missing[:5]}")
        certificate = enrollments[min(updates)].certificate
        if any(enrollments[c].certificate is not certificate and enrollments[c].certificate != certificate
               for c in updates):
            raise InvalidRoundArguments("every client of a round must hold the same roster certificate")

    clients = {cid: SecAggClient(cid, config, round_id, layout, make_randomness(cid),
                                 enrollment=enrollments[cid] if active_security else None, context=context)
               for cid in sorted(updates)}
    server = SecAggServer(config, round_id, layout, certificate=certificate,
                          context=context if active_security else None)

    def active(stage: str) -> list[int]:
        cut = STAGES.index(stage)
        return [c for c in clients if c not in dropouts or STAGES.index(dropouts[c]) > cut]

    def inputs(cid: int) -> dict[str, Any]:  # what a client masks (the stage that needs the model)
        return {"update": updates[cid], "example_count": 1 if example_counts is None else example_counts[cid],
                "metrics": None if metrics is None else metrics.get(cid)}

    times = StageTimes()
    stages = round_stages(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClippingWarning)  # reported once, summed, below (and in every child)
        with ClientHosts(clients, stages, inputs, processes) as hosts:
            for index, stage in enumerate(stages):
                # the server opens a stage as it ends the one before (its time is that stage's). Broadcasts (the full
                # roster, the unmask request) are the same bytes for every client: decoded once per process here,
                # where a deployed client decodes its copy (a per-client decode would make an in-process round
                # O(n^2)); an addressed message (a group roster, forwarded shares) is decoded by its client.
                with times.on_server(stages[index - 1].name if index else stage.name):
                    opening = stage.opens(server)
                    broadcast = None if opening.broadcast is None else (type(opening.broadcast),
                                                                        opening.broadcast.to_bytes())
                    decoded = None if broadcast is None else broadcast[0].from_bytes(broadcast[1])
                    addressed = {cid: (type(m), m.to_bytes()) for cid, m in (opening.addressed or {}).items()}
                # a client the server sent nothing (it excluded the client) has nothing to answer
                answering = [cid for cid in active(stage.name) if opening.addressed is None or cid in addressed]
                for cid, answer, error, seconds, mask_seconds in hosts.answer(index, broadcast, decoded, addressed,
                                                                              answering):
                    times.add_client(stage.name, cid, seconds)
                    if stage.name == "advertise_keys" and active_security and not hosts.runs_here(cid):
                        # it claimed the round id first thing, in the child's copy of its enrollment: ours must
                        # record it too, or a second round under this id would pass here unnoticed
                        enrollments[cid].claim(round_id)
                    if error is not None:
                        raise error
                    if stage.needs_model:
                        times.masking[cid] = mask_seconds
                    with times.on_server(stage.name):
                        stage.receive(server, answer, cid)
    with times.on_server(stages[-1].name):
        summed = server.finish()
    clipping = ClippingReport(
        clipped=summed.decoded.clipped,
        total=len(summed.included) * (layout.update_length + len(config.metrics)),
    )
    warn_clipping(clipping)
    return AggregationResult(
        total=summed.decoded.arrays,
        included=list(summed.included),
        example_count=summed.decoded.example_count,
        metrics=summed.decoded.metrics,
        clipping=clipping,
        error_bound=layout.error_bound(len(summed.included)),
        transcript=server.transcript,
        words=summed.words,
        times=times,
        bytes_sent=_bytes_sent(server.transcript.bytes_in_by_party(), clients),
    )


def _bytes_sent(received: Mapping[int, int], clients: Mapping[int, object]) -> dict[int, int]:
    return {cid: received.get(cid, 0) for cid in clients}


def round_config(num_clients: int, metrics: tuple[str, ...], *, integer_sum_bound: int | None,
                 min_inputs: int | None, settings: Mapping[str, Any]) -> SecAggConfig:
    """The :class:`SecAggConfig` of one round from a run's aggregation settings (privfer's
    ``AggregationConfig``, with ``graph`` and ``security`` resolved)."""
    extra: dict[str, Any] = {}
    if integer_sum_bound is not None:
        extra = dict(encoding="integer", integer_sum_bound=integer_sum_bound, min_inputs=min_inputs)
    return make_config(num_clients=num_clients, metrics=metrics, modulus_bits=settings["modulus_bits"],
                       clipping_range=settings["clipping_range"], graph=settings["graph"],
                       threshold_fraction=settings["threshold_fraction"],
                       expected_dropout=settings["expected_dropout"],
                       colluding_fraction=settings["colluding_fraction"], roster=settings["roster"],
                       security=settings["security"], **extra)


__all__ = ["aggregate", "round_config"]
