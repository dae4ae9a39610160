"""The one-call recipe: run a whole secure-aggregation round in process.

``aggregate(updates, config, dropouts=None)`` creates a client per update and a
server, passes every message through its byte encoding, lets the clients named
in ``dropouts`` vanish before the given stage, and returns the sum over the
clients whose inputs were included. It is the safe default; the client and
server classes are the primitives for real deployments.
"""

from __future__ import annotations

import secrets
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Mapping, Sequence

import numpy as np

from privfer.secagg.client import SecAggClient
from privfer.secagg.config import SecAggConfig
from privfer.secagg.messages import ForwardedShares, KeyRoster, UnmaskRequest
from privfer.secagg.payload import PayloadLayout
from privfer.secagg.quantize import ClippingReport, ClippingWarning
from privfer.secagg.randomness import SYSTEM, Randomness
from privfer.secagg.server import SecAggServer, ServerTranscript

Stage = Literal["advertise_keys", "share_keys", "masked_input", "unmask"]
STAGES: tuple[str, ...] = ("advertise_keys", "share_keys", "masked_input", "unmask")


@dataclass
class StageTimes:
    """Wall-clock seconds per stage: each client's time, and the server's (encoding and decoding included)."""

    clients: dict[str, dict[int, float]] = field(default_factory=lambda: {s: {} for s in STAGES})
    server: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    masking: dict[int, float] = field(default_factory=dict)  # the mask expansion part of MaskedInput

    @contextmanager
    def client(self, stage: str, cid: int) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.clients[stage][cid] = self.clients[stage].get(cid, 0.0) + time.perf_counter() - start

    @contextmanager
    def on_server(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.server[stage] += time.perf_counter() - start

    def client_mean(self, stage: str) -> float:
        values = list(self.clients[stage].values())
        return sum(values) / len(values) if values else 0.0

    def total(self) -> float:
        return sum(sum(v.values()) for v in self.clients.values()) + sum(self.server.values())


@dataclass
class AggregationResult:
    """The sum and what it covers.

    Attributes:
        total: summed arrays (same shapes as the updates) over ``included``.
        included: ids of the clients whose inputs are in the sum.
        example_count: summed example counts of the included clients.
        metrics: summed metrics of the included clients.
        clipping: how many of the included values were clipped (a securely summed coordinate).
        error_bound: largest possible |decoded - exact float sum| per coordinate (quantization).
        transcript: everything the server received and sent (masking backend).
        times: seconds per stage for each client and for the server.
        bytes_sent: bytes each client sent.
    """

    total: list[np.ndarray]
    included: list[int]
    example_count: int
    metrics: dict[str, float]
    clipping: ClippingReport
    error_bound: float
    transcript: ServerTranscript
    words: np.ndarray
    times: StageTimes
    bytes_sent: dict[int, int] = field(default_factory=dict)  # per client, on the wire


def warn_clipping(clipping: ClippingReport) -> None:
    if clipping.clipped:
        warnings.warn(
            f"{clipping.clipped} of {clipping.total} values of the included clients exceeded the clipping range "
            "and were clipped",
            ClippingWarning,
            stacklevel=3,
        )


def check_round_arguments(
    updates: Mapping[int, Sequence[np.ndarray]], num_clients: int, dropouts: Mapping[int, str] | None
) -> dict[int, str]:
    """Validate the driver's arguments (shared by both backends); returns the dropouts as a dict."""
    if len(updates) < 1:
        raise ValueError("no updates to aggregate")
    if len(updates) > num_clients:
        raise ValueError(f"{len(updates)} updates but the config is for num_clients={num_clients}")
    dropouts = dict(dropouts or {})
    unknown = set(dropouts) - set(updates)
    if unknown:
        raise ValueError(f"dropouts name clients without updates: {sorted(unknown)[:5]}")
    bad = {c: s for c, s in dropouts.items() if s not in STAGES}
    if bad:
        raise ValueError(f"dropout stages must be one of {STAGES}, got {bad}")
    return dropouts


def aggregate(
    updates: Mapping[int, Sequence[np.ndarray]],
    config: SecAggConfig | object,
    dropouts: Mapping[int, Stage] | None = None,
    *,
    example_counts: Mapping[int, int] | None = None,
    metrics: Mapping[int, Mapping[str, float]] | None = None,
    round_id: str | None = None,
    randomness: Callable[[int], Randomness] | None = None,
):
    """Securely sum ``updates`` (client id -> list of float arrays).

    ``dropouts`` maps a client id to the stage it never sends (and none after):
    "advertise_keys", "share_keys", "masked_input" (its input is excluded, its
    masks are recovered), or "unmask" (its input is included; its self mask is
    recovered from the others' shares). A config for the CKKS backend is
    dispatched to :func:`privfer.secagg.he.aggregate`.
    """
    if getattr(config, "backend", None) == "ckks":
        from privfer.secagg.he import aggregate as he_aggregate

        return he_aggregate(updates, config, dropouts, example_counts=example_counts, metrics=metrics,
                            round_id=round_id)
    if not isinstance(config, SecAggConfig):
        raise TypeError(f"config must be a SecAggConfig (or a CKKS config), got {type(config).__name__}")
    dropouts = check_round_arguments(updates, config.num_clients, dropouts)
    first = next(iter(updates.values()))
    layout = PayloadLayout.for_arrays(first, config)
    round_id = round_id or secrets.token_hex(8)
    make_randomness = randomness or (lambda _client: SYSTEM)

    clients = {cid: SecAggClient(cid, config, round_id, layout, make_randomness(cid)) for cid in sorted(updates)}
    server = SecAggServer(config, round_id, layout)

    def active(stage: str) -> list[int]:
        cut = STAGES.index(stage)
        return [c for c in clients if c not in dropouts or STAGES.index(dropouts[c]) > cut]

    times = StageTimes()
    for cid in active("advertise_keys"):
        with times.client("advertise_keys", cid):
            advert = clients[cid].advertise_keys().to_bytes()
        with times.on_server("advertise_keys"):
            server.receive_advertise(advert)
    with times.on_server("advertise_keys"):
        roster = server.key_roster().to_bytes()
    for cid in active("share_keys"):
        with times.client("share_keys", cid):
            shared = clients[cid].share_keys(KeyRoster.from_bytes(roster)).to_bytes()
        with times.on_server("share_keys"):
            server.receive_share_keys(shared)
    with times.on_server("share_keys"):
        bundles = {cid: bundle.to_bytes() for cid, bundle in server.forward_shares().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClippingWarning)  # reported once, summed, below
        for cid in active("masked_input"):
            with times.client("masked_input", cid):
                masked = clients[cid].masked_input(
                    ForwardedShares.from_bytes(bundles[cid]),
                    updates[cid],
                    example_count=1 if example_counts is None else example_counts[cid],
                    metrics=None if metrics is None else metrics.get(cid),
                ).to_bytes()
            with times.on_server("masked_input"):
                server.receive_masked_input(masked)
            times.masking[cid] = clients[cid].mask_seconds
    with times.on_server("masked_input"):
        request = server.unmask_request().to_bytes()
    for cid in active("unmask"):
        with times.client("unmask", cid):
            response = clients[cid].unmask(UnmaskRequest.from_bytes(request)).to_bytes()
        with times.on_server("unmask"):
            server.receive_unmask(response)
    with times.on_server("unmask"):
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
        bytes_sent={cid: server.transcript.bytes_in(cid) for cid in clients},
    )


__all__ = ["AggregationResult", "STAGES", "Stage", "StageTimes", "aggregate"]
