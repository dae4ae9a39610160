"""Forged inputs (attack 7 of issue 24): a sum no in-range clients could produce is refused, never released."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privfer.secagg import OutOfRangeSum, PayloadLayout, SecAggClient, SecAggConfig, SecAggServer, aggregate
from privfer.secagg import messages as m
from privfer.secagg.prg import word_dtype


def run(config: SecAggConfig, updates: dict, counts: dict | None = None, metrics: dict | None = None,
        forge: np.ndarray | None = None):
    """One round through the stage API; ``forge`` is added (mod 2^k) to client 1's masked vector — what a
    malicious client does to its own plaintext, since masks are additive."""
    layout = PayloadLayout.for_arrays(updates[1], config)
    clients = {c: SecAggClient(c, config, "bounds", layout) for c in updates}
    server = SecAggServer(config, "bounds", layout)
    for c, client in clients.items():
        server.receive_advertise(client.advertise_keys(), peer=c)
    roster = server.key_roster()
    for c, client in clients.items():
        server.receive_share_keys(client.share_keys(roster), peer=c)
    for c, bundle in server.forward_shares().items():
        masked = clients[c].masked_input(bundle, updates[c], example_count=(counts or {}).get(c, 1),
                                         metrics=(metrics or {}).get(c))
        if c == 1 and forge is not None:
            vector = masked.vector + forge.astype(word_dtype(config.modulus_bits))
            masked = m.MaskedInput(round_id="bounds", sender=1, modulus_bits=config.modulus_bits, vector=vector)
        server.receive_masked_input(masked, peer=c)
    request = server.unmask_request()
    for c in request.survivors:
        server.receive_unmask(clients[c].unmask(request), peer=c)
    return server.finish(), server


def forged(config: SecAggConfig, layout_length: int, index: int, value: int) -> np.ndarray:
    delta = np.zeros(layout_length, dtype=np.uint64)
    delta[index] = value % (1 << config.modulus_bits)
    return delta


CONFIG = SecAggConfig(num_clients=4, modulus_bits=64, clipping_range=1.0, metrics=("loss",), metric_range=10.0,
                      max_examples=1000)
UPDATES = {c: [np.full(3, 0.26)] for c in range(1, 5)}
COUNTS = {c: 50 for c in range(1, 5)}
LOSSES = {c: {"loss": 1.0} for c in range(1, 5)}
LENGTH = 3 + 2 + 1  # values | count | clipped | loss


@pytest.mark.parametrize("index, value, part", [
    (0, round(5000 * 2 ** CONFIG.update_precision_bits), "update value 0"),  # 0.26 -> 5,000.26
    (3, 1 << 40, "example count"),  # 50 -> 1,099,511,627,826
    (3, -1000, "example count"),  # a negative total weight
    (4, -7, "clipping count"),
    (5, round(1e6 * 2 ** CONFIG.metric_precision_bits), "metric"),
])
def test_a_forged_coordinate_count_or_metric_refuses_the_round(index, value, part):
    honest, _ = run(CONFIG, UPDATES, COUNTS, LOSSES)
    assert honest.decoded.example_count == 200  # the same round, unforged, completes
    with pytest.raises(OutOfRangeSum, match=part):
        run(CONFIG, UPDATES, COUNTS, LOSSES, forge=forged(CONFIG, LENGTH, index, value))


def test_a_forged_integer_contribution_beyond_the_callers_bound_is_refused():
    config = SecAggConfig(num_clients=3, encoding="integer", integer_sum_bound=1000, modulus_bits=32)
    updates = {c: [np.array([10, -10], dtype=np.int64)] for c in range(1, 4)}
    run(config, updates)
    with pytest.raises(OutOfRangeSum, match="coordinate 1"):
        run(config, updates, forge=forged(config, 2, 1, -5000))


def test_the_server_releases_nothing_after_a_refusal():
    with pytest.raises(OutOfRangeSum):
        run(CONFIG, UPDATES, COUNTS, LOSSES, forge=forged(CONFIG, LENGTH, 3, 1 << 40))
    # the recipe raises too: no AggregationResult exists to read


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.floats(-3.0, 3.0), min_size=4, max_size=4), counts=st.lists(st.integers(0, 1000),
       min_size=4, max_size=4), losses=st.lists(st.floats(-50.0, 50.0), min_size=4, max_size=4),
       dropped=st.integers(0, 4))
def test_honest_inputs_at_and_beyond_the_clipping_range_are_never_refused(values, counts, losses, dropped):
    """No false alarms: honest clients at the extremes (clipped values, the largest counts) always pass."""
    updates = {c: [np.full(3, values[c - 1])] for c in range(1, 5)}
    dropouts = {dropped: "masked_input"} if dropped else {}
    result = aggregate(updates, CONFIG, dropouts, example_counts={c: counts[c - 1] for c in range(1, 5)},
                       metrics={c: {"loss": losses[c - 1]} for c in range(1, 5)})
    assert result.example_count == sum(counts[c - 1] for c in result.included)
