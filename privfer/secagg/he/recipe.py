"""The recipe: one CKKS round in process, every role played, one AggregationResult."""

from __future__ import annotations

import secrets
import time
from typing import Any, Mapping, Sequence

import numpy as np

from privfer.errors import ConfigError
from privfer.secagg.config import assumed_colluders
from privfer.secagg.he.config import CKKSConfig, make_ckks_config
from privfer.secagg.he.packing import HELayout
from privfer.secagg.he.roles import HEClient, HEServer, KeyAuthority
from privfer.secagg.identity import Enrollment, enroll_in_process
from privfer.secagg.quantize import ClippingReport, ClippingWarning
from privfer.secagg.rounds import (STAGES, AggregationResult, StageTimes, agreed_shapes, check_round_arguments,
                                   warn_clipping)


def aggregate(
    updates: Mapping[int, Sequence[np.ndarray]],
    config: CKKSConfig,
    dropouts: Mapping[int, str] | None = None,
    *,
    example_counts: Mapping[int, int] | None = None,
    metrics: Mapping[int, Mapping[str, float]] | None = None,
    round_id: str | None = None,
    enrollments: Mapping[int, Enrollment] | None = None,
):
    """The CKKS counterpart of :func:`privfer.secagg.aggregate` (same arguments and result); ``enrollments`` as
    there (default: an in-process enrollment authority).

    A client dropped at any stage up to and including "masked_input" never sends
    its ciphertext and is absent from the sum; a client dropped at "unmask" had
    already sent it (CKKS has no later stage), so it is included.
    """
    import warnings

    dropouts = check_round_arguments(updates, config.num_clients, dropouts, example_counts, metrics)
    round_id = round_id or secrets.token_hex(8)
    layout = HELayout(tuple(agreed_shapes(updates, dropouts)), config)
    if enrollments is None:  # an in-process enrollment authority, not the server, enrolls the round's clients
        enrollments = enroll_in_process(sorted(updates))
    missing = sorted(set(updates) - set(enrollments))
    if missing:
        from privfer.secagg.errors import InvalidRoundArguments

        raise InvalidRoundArguments(f"enrollments has no identity for clients {missing[:5]}")
    certificate = enrollments[min(updates)].certificate
    times = StageTimes()
    start = time.perf_counter()
    authority = KeyAuthority(config, certificate)
    public = authority.public_context()
    server = HEServer(public, layout, round_id, config, certificate)
    times.server["advertise_keys"] += time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClippingWarning)
        for cid in sorted(updates):
            if cid in dropouts and STAGES.index(dropouts[cid]) <= STAGES.index("masked_input"):
                continue
            with times.client("masked_input", cid):
                client = HEClient(cid, public, layout, round_id, enrollments[cid], authority.sealing_key)
                message = client.encrypt(
                    updates[cid],
                    1 if example_counts is None else example_counts[cid],
                    None if metrics is None else metrics.get(cid),
                ).to_bytes()
            with times.on_server("masked_input"):
                server.receive(message)
    with times.on_server("unmask"):
        bundle = server.bundle().to_bytes()
    start = time.perf_counter()
    plain = authority.decrypt(bundle, layout, round_id)
    times.server["unmask"] += time.perf_counter() - start  # the key authority's share, reported with the server's
    clipping = ClippingReport(plain.clipped, len(plain.included) * (layout.update_length + len(config.metrics)))
    warn_clipping(clipping)
    return AggregationResult(
        total=plain.arrays,
        included=list(plain.included),
        example_count=plain.example_count,
        metrics=plain.metrics,
        clipping=clipping,
        error_bound=config.release_error_bound(len(plain.included)),
        transcript=None,  # no masking transcript: the server's view is its ciphertexts (HEServer)
        words=None,
        times=times,
        bytes_sent=dict(server.bytes_in),
    )


def round_config(num_clients: int, metrics: tuple[str, ...], *, integer_sum_bound: int | None,
                 min_inputs: int | None, settings: Mapping[str, Any]) -> CKKSConfig:
    """The :class:`CKKSConfig` of one round. Integer contributions are refused: CKKS's approximate decryption
    cannot give the exact sum their noise shares need. The key authority releases sums of at least two honest
    clients besides the colluders the settings allow (a server chooses which signed updates it forwards)."""
    del min_inputs  # the key authority's min_clients is the bound here
    if integer_sum_bound is not None:
        raise ConfigError("aggregation.backend = 'ckks' cannot sum integer contributions exactly (approximate "
                          "decryption); use 'masking'")
    colluders = assumed_colluders(num_clients, settings["colluding_fraction"])
    return make_ckks_config(num_clients=num_clients, clipping_range=settings["clipping_range"], metrics=metrics,
                            min_clients=min(num_clients, max(2, colluders + 2)))
