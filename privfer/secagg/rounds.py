"""What every secure-aggregation backend shares: the stage names, per-stage timings, the one result type.

The masking recipe (:mod:`privfer.secagg.aggregate`) and the CKKS recipe
(:mod:`privfer.secagg.he`) both return an :class:`AggregationResult` and
validate their arguments with :func:`check_round_arguments`; this module is
below both, so neither imports the other's internals.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Literal, Mapping, Sequence

import numpy as np

from privfer.secagg.errors import InvalidRoundArguments, InvalidUpdate
from privfer.secagg.quantize import ClippingReport, ClippingWarning
from privfer.secagg.shamir import PRIME

MAX_CLIENT_ID = PRIME - 1
"""Client ids are the Shamir evaluation points: 1..p-1 (0 is the secret's point)."""

if TYPE_CHECKING:
    from privfer.secagg.server import ServerTranscript

Stage = Literal["advertise_keys", "share_keys", "masked_input", "consistency", "unmask"]
STAGES: tuple[str, ...] = ("advertise_keys", "share_keys", "masked_input", "consistency", "unmask")
"""A client dropped at "consistency" sent its masked input but never signs the round (active security) nor
answers the unmask request: its input is included. Under semi-honest security the stage does not exist and such
a client simply never answers the unmask request."""
EXCLUDING_STAGES: tuple[str, ...] = STAGES[: STAGES.index("masked_input") + 1]
"""Dropping at or before the masked input excludes a client's input; dropping later, it is included."""


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
        self.add_client(stage, cid, time.perf_counter() - start)

    def add_client(self, stage: str, cid: int, seconds: float) -> None:
        """Count ``seconds`` of client ``cid``'s time in ``stage`` (measured where the client ran)."""
        self.clients[stage][cid] = self.clients[stage].get(cid, 0.0) + seconds

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
        transcript: everything the server received and sent (masking; None for CKKS, whose messages are
            ciphertexts kept by ``HEServer``).
        times: seconds per stage for each client and for the server.
        bytes_sent: bytes each client sent.
    """

    total: list[np.ndarray]
    included: list[int]
    example_count: int
    metrics: dict[str, float]
    clipping: ClippingReport
    error_bound: float
    transcript: "ServerTranscript | None"
    words: np.ndarray | None  # the unmasked sum's words (masking); None for CKKS
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
    updates: Mapping[int, Sequence[np.ndarray]], num_clients: int, dropouts: Mapping[int, str] | None,
    example_counts: Mapping[int, int] | None = None, metrics: Mapping[int, Mapping[str, float]] | None = None,
    *, integer: bool = False,
) -> dict[int, str]:
    """Validate the recipe's arguments (shared by every backend); returns the dropouts as a dict.

    Raises :class:`~privfer.secagg.errors.InvalidRoundArguments` for no updates, more than ``num_clients``,
    client ids that are not integers in 1..MAX_CLIENT_ID, dropouts of unknown clients or stages, example counts
    that miss a client, metrics that are not a mapping of mappings, and either of them under the integer
    encoding (which sums the caller's integers and nothing else); :class:`InvalidUpdate` for an update that is
    not a sequence of arrays.
    """
    if not isinstance(updates, Mapping):
        raise InvalidRoundArguments(f"updates map client ids to their arrays, got {type(updates).__name__}")
    if len(updates) < 1:
        raise InvalidRoundArguments("no updates to aggregate")
    if len(updates) > num_clients:
        raise InvalidRoundArguments(f"{len(updates)} updates but the config is for num_clients={num_clients}")
    bad_ids = [c for c in updates if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer))
               or not 1 <= c <= MAX_CLIENT_ID]
    if bad_ids:
        raise InvalidRoundArguments(f"client ids must be integers in 1..{MAX_CLIENT_ID}, got {bad_ids[:5]}")
    dropouts = dict(dropouts or {})
    unknown = set(dropouts) - set(updates)
    if unknown:
        raise InvalidRoundArguments(f"dropouts name clients without updates: {sorted(unknown)[:5]}")
    bad = {c: s for c, s in dropouts.items() if s not in STAGES}
    if bad:
        raise InvalidRoundArguments(f"dropout stages must be one of {STAGES}, got {bad}")
    for client, update in updates.items():
        if isinstance(update, np.ndarray) or not isinstance(update, Sequence):
            raise InvalidUpdate(f"client {client}'s update is a {type(update).__name__}, not a sequence of arrays")
    if integer and (example_counts is not None or metrics is not None):
        raise InvalidRoundArguments("the integer encoding sums the caller's integers only: no example_counts or "
                                    "metrics (put what must be summed into the arrays)")
    if example_counts is not None:
        if not isinstance(example_counts, Mapping):
            raise InvalidRoundArguments("example_counts maps client ids to counts")
        missing = sorted(set(updates) - set(example_counts))
        if missing:
            raise InvalidRoundArguments(f"example_counts has no count for clients {missing[:5]}")
    if metrics is not None and (not isinstance(metrics, Mapping)
                                or not all(isinstance(m, Mapping) for m in metrics.values())):
        raise InvalidRoundArguments("metrics maps client ids to {name: value} mappings")
    return dropouts


def agreed_shapes(updates: Mapping[int, Sequence[np.ndarray]], dropouts: Mapping[int, str]) -> list[tuple[int, ...]]:
    """The round's public shapes: those of the first (lowest-id) client whose input is included, so a client
    dropped before sending cannot make everyone else's update look mismatched."""
    included = [c for c in sorted(updates) if dropouts.get(c) not in EXCLUDING_STAGES] or sorted(updates)
    return [tuple(int(n) for n in np.shape(a)) for a in updates[included[0]]]




__all__ = ["AggregationResult", "EXCLUDING_STAGES", "MAX_CLIENT_ID", "STAGES", "agreed_shapes", "Stage", "StageTimes", "check_round_arguments", "warn_clipping"]
