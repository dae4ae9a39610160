"""A caller's bad input to privfer.secagg: one specific exception per kind, for every backend, and nothing lost.

Every backend checks its callers' updates with the same function
(:func:`privfer.secagg.payload.check_update`), so the masking, CKKS and plain
backends refuse the same inputs with the same :class:`InvalidInput` subclass;
nothing is truncated (2.7 examples) or dropped (an imaginary part) silently.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from privfer.secagg import (
    InvalidExampleCount,
    InvalidInput,
    InvalidRoundArguments,
    InvalidUpdate,
    PayloadLayout,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    ShapeMismatch,
    aggregate,
)
from privfer.secagg.he import make_ckks_config
from privfer.secagg.plain import PlainConfig

GOOD = [np.ones((2, 3)), np.zeros(4)]

CONFIGS = {
    "masking": lambda: SecAggConfig(num_clients=3),
    "ckks": lambda: make_ckks_config(num_clients=3),
    "plain": lambda: PlainConfig(num_clients=3),
}

BAD_UPDATES = {
    "another shape": ([np.ones((3, 2)), np.zeros(4)], ShapeMismatch),
    "one array missing": ([np.ones((2, 3))], ShapeMismatch),
    "NaN": ([np.full((2, 3), np.nan), np.zeros(4)], InvalidUpdate),
    "infinity": ([np.ones((2, 3)), np.array([0, 0, -np.inf, 0])], InvalidUpdate),
    "complex": ([np.ones((2, 3)) + 1j, np.zeros(4)], InvalidUpdate),
    "booleans": ([np.ones((2, 3), dtype=bool), np.zeros(4)], InvalidUpdate),
    "text": ([np.full((2, 3), "a"), np.zeros(4)], InvalidUpdate),
    "objects": ([np.ones((2, 3)), np.array([None] * 4)], InvalidUpdate),
    "one bare array": (np.ones((2, 3)), InvalidUpdate),
}

BAD_COUNTS = {"a float": 2.7, "a whole float": 2.0, "a bool": True, "a negative": -1, "text": "3"}


@pytest.mark.parametrize("backend", CONFIGS)
@pytest.mark.parametrize("case", BAD_UPDATES)
def test_a_bad_update_raises_its_specific_error_on_every_backend(backend, case):
    update, error = BAD_UPDATES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error):
            aggregate({1: GOOD, 2: update, 3: GOOD}, CONFIGS[backend]())


@pytest.mark.parametrize("backend", CONFIGS)
@pytest.mark.parametrize("case", BAD_COUNTS)
def test_an_example_count_must_be_a_non_negative_integer(backend, case):
    with pytest.raises(InvalidExampleCount):
        aggregate({1: GOOD, 2: GOOD, 3: GOOD}, CONFIGS[backend](), example_counts={1: 1, 2: BAD_COUNTS[case], 3: 1})


@pytest.mark.parametrize("backend", CONFIGS)
@pytest.mark.parametrize("updates", [{}, {0: GOOD, 1: GOOD}, {True: GOOD, 2: GOOD}, {"1": GOOD, 2: GOOD},
                                     {c: GOOD for c in range(1, 5)}])
def test_arguments_that_are_no_round_are_refused(backend, updates):
    with pytest.raises(InvalidRoundArguments):
        aggregate(updates, CONFIGS[backend]())


@pytest.mark.parametrize("backend", CONFIGS)
def test_integer_like_counts_and_every_real_dtype_are_accepted(backend):
    updates = {1: [np.ones((2, 3), np.float32), np.arange(4)], 2: GOOD, 3: [np.ones((2, 3), np.int8), np.zeros(4)]}
    result = aggregate(updates, CONFIGS[backend](), example_counts={1: np.int64(2), 2: 3, 3: np.uint8(5)})
    assert result.example_count == 10
    np.testing.assert_allclose(result.total[0], 3.0, atol=result.error_bound)
    np.testing.assert_allclose(result.total[1], np.arange(4), atol=result.error_bound)


def test_every_error_is_an_invalid_input_and_a_value_error():
    for error in (ShapeMismatch, InvalidUpdate, InvalidExampleCount, InvalidRoundArguments):
        assert issubclass(error, InvalidInput) and issubclass(error, ValueError)


def test_integer_encoding_never_truncates_floats():
    config = SecAggConfig(num_clients=3, encoding="integer", integer_sum_bound=100)
    with pytest.raises(InvalidUpdate, match="integer"):
        aggregate({1: [np.array([2.7])], 2: [np.array([1])], 3: [np.array([1])]}, config)
    with pytest.raises(InvalidUpdate, match="integer"):
        aggregate({1: [np.array([2.7])], 2: [np.array([1])], 3: [np.array([1])]},
                  PlainConfig(num_clients=3, encoding="integer"))


def test_a_client_stays_usable_after_a_rejected_input():
    """The stage API: a rejected update changes nothing, the same client then sends a corrected one and the
    round's sum is exact."""
    config = SecAggConfig(num_clients=3)
    layout = PayloadLayout(((4,),), config)
    clients = {c: SecAggClient(c, config, "r", layout) for c in (1, 2, 3)}
    server = SecAggServer(config, "r", layout)
    for cid, client in clients.items():
        server.receive_advertise(client.advertise_keys().to_bytes(), peer=cid)
    roster = server.key_roster()
    for cid, client in clients.items():
        server.receive_share_keys(client.share_keys(roster).to_bytes(), peer=cid)
    forwarded = server.forward_shares()
    for bad, error in ((np.array([1.0, np.nan, 0, 0]), InvalidUpdate), (np.ones(5), ShapeMismatch),
                       (np.ones(4) + 2j, InvalidUpdate)):
        with pytest.raises(error):
            clients[2].masked_input(forwarded[2], [bad])
        with pytest.raises(InvalidExampleCount):
            clients[2].masked_input(forwarded[2], [np.ones(4)], example_count=2.7)
    assert clients[2].stage == "shared"
    for cid, client in clients.items():
        server.receive_masked_input(client.masked_input(forwarded[cid], [np.full(4, cid / 4)]).to_bytes(), peer=cid)
    request = server.unmask_request()
    for cid, client in clients.items():
        server.receive_unmask(client.unmask(request).to_bytes(), peer=cid)
    total = server.finish()
    np.testing.assert_allclose(total.decoded.arrays[0], 1.5, atol=3 * 2.0**-config.update_precision_bits)


INTEGER = {
    "masking": lambda: SecAggConfig(num_clients=3, encoding="integer", integer_sum_bound=100),
    "plain": lambda: PlainConfig(num_clients=3, encoding="integer"),
}


@pytest.mark.parametrize("backend", INTEGER)
@pytest.mark.parametrize("value", [np.array([2**64 - 1], np.uint64), np.array([-(2**63)]), [2**63], [2**64],
                                   np.array([2**62])])
def test_integers_beyond_the_bound_never_wrap(backend, value):
    zero = [np.zeros(1, np.int64)]
    with pytest.raises(InvalidUpdate):
        aggregate({1: [value], 2: zero, 3: zero}, INTEGER[backend]())


@pytest.mark.parametrize("backend", INTEGER)
def test_the_integer_encoding_takes_no_counts_or_metrics(backend):
    ones = [np.ones(1, np.int64)]
    with pytest.raises(InvalidRoundArguments, match="integers only"):
        aggregate({1: ones, 2: ones, 3: ones}, INTEGER[backend](), example_counts={1: 2, 2: 2, 3: 2})


@pytest.mark.parametrize("backend", CONFIGS)
def test_counts_for_every_client_and_well_formed_metrics(backend):
    with pytest.raises(InvalidRoundArguments, match="no count for clients"):
        aggregate({1: GOOD, 2: GOOD, 3: GOOD}, CONFIGS[backend](), example_counts={})
    with pytest.raises(InvalidRoundArguments, match="mappings"):
        aggregate({1: GOOD, 2: GOOD, 3: GOOD}, CONFIGS[backend](), metrics={1: [("loss", 2.0)]})


@pytest.mark.parametrize("backend", CONFIGS)
@pytest.mark.parametrize("update", [[np.ma.array(np.ones((2, 3)), mask=True), np.zeros(4)],
                                    [[[1.0, 2.0, 3.0], [4.0, 5.0]], np.zeros(4)]])
def test_masked_and_ragged_arrays_are_refused(backend, update):
    with pytest.raises(InvalidUpdate):
        aggregate({1: GOOD, 2: update, 3: GOOD}, CONFIGS[backend]())


def test_a_metric_that_overflows_float64_is_refused():
    config = SecAggConfig(num_clients=3, metrics=("loss",))
    for value in (np.longdouble("1e400"), 10**400):
        with pytest.raises(InvalidUpdate, match="finite"):
            aggregate({1: GOOD, 2: GOOD, 3: GOOD}, config, metrics={1: {"loss": value}})


@pytest.mark.parametrize("backend", CONFIGS)
def test_the_agreed_shapes_are_an_included_clients(backend):
    """A client dropped before sending does not make every other update look mismatched."""
    result = aggregate({1: [np.ones(5)], 2: GOOD, 3: GOOD}, CONFIGS[backend](), {1: "advertise_keys"})
    assert result.included == [2, 3]
    np.testing.assert_allclose(result.total[0], 2.0, atol=result.error_bound)
