"""A client's protocol state survives export and restore at every stage (frameworks that run each stage in a fresh
process), and a damaged state is refused without revealing what it held."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privfer.secagg import CorruptState, PayloadLayout, RoundAborted, SecAggClient, SecAggConfig, SecAggServer, WrongStage
from privfer.secagg import messages as m
from privfer.secagg.client_state import STATE_VERSION


def run_round(n, dropped_before_masking=(), restore=True, seed=0):
    """One round of n clients; with ``restore`` every client is rebuilt from its exported bytes before each stage."""
    rng = np.random.default_rng(seed)
    config = SecAggConfig(num_clients=n)
    updates = {c: [np.round(rng.uniform(-2, 2, (3, 4)) * 2**16) / 2**16] for c in range(1, n + 1)}
    layout = PayloadLayout.for_arrays(updates[1], config)
    clients = {c: SecAggClient(c, config, "round-7", layout) for c in updates}
    server = SecAggServer(config, "round-7", layout)

    def client(cid):
        if restore:
            clients[cid] = SecAggClient.restore(clients[cid].export_state())
        return clients[cid]

    for c in clients:
        server.receive_advertise(client(c).advertise_keys().to_bytes(), peer=c)
    roster = m.KeyRoster.from_bytes(server.key_roster().to_bytes())
    for c in clients:
        server.receive_share_keys(client(c).share_keys(roster).to_bytes(), peer=c)
    bundles = server.forward_shares()
    survivors = [c for c in clients if c not in dropped_before_masking]
    for c in survivors:
        server.receive_masked_input(client(c).masked_input(bundles[c], updates[c]).to_bytes(), peer=c)
    request = m.UnmaskRequest.from_bytes(server.unmask_request().to_bytes())
    for c in survivors:
        server.receive_unmask(client(c).unmask(request).to_bytes(), peer=c)
    total = server.finish().decoded.arrays[0]
    return total, sum(updates[c][0] for c in survivors), clients


@pytest.mark.parametrize("dropped", [(), (2,)])
def test_a_round_restored_before_every_stage_gives_the_exact_sum(dropped):
    total, expected, _ = run_round(5, dropped)
    np.testing.assert_array_equal(total, expected)


def test_a_restored_client_equals_the_original():
    _, _, clients = run_round(4, restore=False)
    original = clients[1]
    restored = SecAggClient.restore(original.export_state())
    assert restored.export_state() == original.export_state()
    assert restored.stage == "unmasked"


def test_a_restored_client_still_answers_only_once():
    _, _, clients = run_round(4)
    request = m.UnmaskRequest(round_id="round-7", sender=m.SERVER, survivors=(1, 2, 3, 4), dropped=())
    with pytest.raises(WrongStage):
        SecAggClient.restore(clients[1].export_state()).unmask(request)


def test_an_aborted_client_has_no_state_to_export():
    config = SecAggConfig(num_clients=5)
    layout = PayloadLayout.for_arrays([np.zeros(3)], config)
    client = SecAggClient(1, config, "r", layout)
    advert = client.advertise_keys()
    lonely = m.KeyRoster(round_id="r", sender=m.SERVER, keys={1: (advert.c_public, advert.s_public)})
    with pytest.raises(RoundAborted):
        client.share_keys(lonely)
    with pytest.raises(WrongStage, match="aborted"):
        client.export_state()


def state_after_share_keys():
    _, _, clients = run_round(4, restore=False)
    return clients[2].export_state()


def test_version_and_magic_are_checked():
    state = state_after_share_keys()
    with pytest.raises(CorruptState, match="magic"):
        SecAggClient.restore(b"XXXX" + state[4:])
    with pytest.raises(CorruptState, match="version"):
        SecAggClient.restore(state[:4] + bytes([99]) + state[5:])
    with pytest.raises(CorruptState):
        SecAggClient.restore("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("field, value", [
    ("keys", ["AAAA", "AAAA"]),
    ("held", {"1": ["AAAA", "AAAA"]}),
    ("stage", "finished"),
    ("config", {"num_clients": 1}),
    ("shapes", "twelve"),
    ("self_seed", "!!!"),
    ("roster", {"1": ["short", "x"]}),
])
def test_a_damaged_field_is_named_and_its_value_never_shown(field, value):
    state = state_after_share_keys()
    document = json.loads(state[5:])
    secret_seed = document["self_seed"]
    document[field] = value
    with pytest.raises(CorruptState, match=repr(field)) as caught:
        SecAggClient.restore(state[:5] + json.dumps(document).encode())
    assert secret_seed not in str(caught.value)


def test_a_state_past_stage_new_without_keys_is_refused():
    document = json.loads(state_after_share_keys()[5:])
    document["keys"] = None
    with pytest.raises(CorruptState, match="no keys"):
        SecAggClient.restore(b"PFSC" + bytes([STATE_VERSION]) + json.dumps(document).encode())


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, 4000), flip=st.integers(0, 4000), byte=st.integers(0, 255))
def test_truncated_or_flipped_states_raise_only_corrupt_state(cut, flip, byte):
    state = bytearray(STATE)
    if flip < len(state):
        state[flip] = byte
    damaged = bytes(state[: min(cut, len(state))] if cut < len(state) else state)
    try:
        SecAggClient.restore(damaged)
    except CorruptState:
        pass


STATE = state_after_share_keys()
