"""The one-call recipe: run a whole secure-aggregation round in process, whichever backend the config names.

``aggregate(updates, config, dropouts=None)`` hands the round to the recipe of the config's backend
(:mod:`privfer.secagg.backends`: pairwise masking, CKKS, or the plain baseline), which creates a client per
update and a server (or key authority), passes every message through its byte encoding, lets the clients named
in ``dropouts`` vanish before the given stage, and returns the sum over the clients whose inputs were included —
one :class:`AggregationResult` whatever the backend. It is the safe default; the client and server classes are
the primitives for real deployments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence, Union

import numpy as np

from privfer.secagg.backends import backend_of
from privfer.secagg.identity import Enrollment
from privfer.secagg.randomness import Randomness
from privfer.secagg.rounds import STAGES, AggregationResult, Stage, StageTimes
from privfer.secagg.statements import NO_CONTEXT

if TYPE_CHECKING:
    from privfer.secagg.config import SecAggConfig
    from privfer.secagg.he.config import CKKSConfig
    from privfer.secagg.plain import PlainConfig

    BackendConfig = Union[SecAggConfig, CKKSConfig, PlainConfig]


def aggregate(
    updates: Mapping[int, Sequence[np.ndarray]],
    config: "BackendConfig",
    dropouts: Mapping[int, Stage] | None = None,
    *,
    example_counts: Mapping[int, int] | None = None,
    metrics: Mapping[int, Mapping[str, float]] | None = None,
    round_id: str | None = None,
    randomness: Callable[[int], Randomness] | None = None,
    enrollments: Mapping[int, Enrollment] | None = None,
    context: bytes = NO_CONTEXT,
    processes: int | None = None,
) -> AggregationResult:
    """Securely sum ``updates`` (client id -> list of float arrays) with the backend ``config`` belongs to.

    ``dropouts`` maps a client id to the stage it never sends (and none after):
    "advertise_keys", "share_keys", "masked_input" (its input is excluded, its
    masks are recovered), "consistency" or "unmask" (its input is included; its
    self mask is recovered from the others' shares).

    Under ``security = "active"``, ``enrollments`` gives each client its
    member identity and the roster certificate (one certificate for all); when
    omitted, an in-process enrollment authority — a different object from the
    server — enrolls the round's clients with fresh keys. ``context`` is the
    32-byte digest of the model and plan every client trained from. ``processes`` (masking only; default 1)
    runs the clients' side of the round in that many processes — this one and forked children, each client in
    one of them (:mod:`privfer.secagg.hosts`; Linux) — for the same sum, included set and messages. A
    :class:`SecAggConfig` runs the masking protocol (:func:`privfer.secagg.masking.aggregate`: every option), a
    CKKS config :func:`privfer.secagg.he.aggregate` (``enrollments``: signed updates), a
    :class:`~privfer.secagg.plain.PlainConfig` the plain (NOT private) sum; an option a backend has no use for
    (the masking protocol's ``randomness``, ``context`` and ``processes``) is not passed to it.
    """
    backend = backend_of(config)
    given = {"randomness": randomness, "enrollments": enrollments, "context": context, "processes": processes}
    options = {name: value for name, value in given.items() if value is not None and name in backend.options}
    return backend.recipe()(updates, config, dropouts, example_counts=example_counts, metrics=metrics,
                            round_id=round_id, **options)


__all__ = ["AggregationResult", "STAGES", "Stage", "StageTimes", "aggregate"]
