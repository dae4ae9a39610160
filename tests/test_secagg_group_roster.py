"""roster = "group": each client receives only its group's keys and unmask lists (O(k) bytes, not O(n))."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privfer.secagg import (
    STAGES,
    MalformedMessage,
    PayloadLayout,
    RoundAborted,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    UnknownSender,
    UnsafeUnmaskRequest,
    WrongStage,
    aggregate,
)
from privfer.secagg import messages as m
from privfer.secagg.graph import graph_seed, neighbourhoods


@st.composite
def group_rounds(draw):
    n = draw(st.integers(5, 60))
    config = SecAggConfig(num_clients=n, graph="harary", roster="group", modulus_bits=draw(st.sampled_from([32, 64])),
                          threshold_fraction=draw(st.sampled_from([0.5, 2 / 3])))
    slack = max(0, (config.group_size - config.group_threshold) // 2)
    dropped = draw(st.lists(st.integers(1, n), unique=True, max_size=slack))
    return config, {c: draw(st.sampled_from(STAGES)) for c in dropped}, draw(st.integers(0, 2**32 - 1))


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(group_rounds())
def test_the_sum_is_exact_after_dropouts_and_equals_the_full_roster_round(case):
    config, dropouts, seed = case
    rng = np.random.default_rng(seed)
    updates = {c: [np.round(rng.uniform(-4, 4, 7) * 2**12) / 2**12] for c in range(1, config.num_clients + 1)}
    result = aggregate(updates, config, dropouts)
    included = sorted(c for c in updates if dropouts.get(c) not in ("advertise_keys", "share_keys", "masked_input"))
    assert result.included == included
    np.testing.assert_array_equal(result.total[0], sum(updates[c][0] for c in included))
    full = aggregate(updates, config.model_copy(update={"roster": "full"}), dropouts)
    assert full.included == included
    np.testing.assert_array_equal(full.total[0], result.total[0])


@pytest.mark.slow
def test_each_client_receives_its_group_only_and_bytes_grow_with_k_not_n():
    received = {}
    for n in (200, 800):
        config = SecAggConfig(num_clients=n, graph="harary", roster="group")
        updates = {c: [np.zeros(16)] for c in range(1, n + 1)}
        result = aggregate(updates, config, round_id=f"bytes-{n}")
        sent = [e.message for e in result.transcript.entries if e.direction == "out"]
        assert not any(isinstance(x, (m.KeyRoster, m.UnmaskRequest)) for x in sent)  # no O(n) broadcast
        ids = sorted(updates)
        graph = neighbourhoods(ids, config.degree, graph_seed(f"bytes-{n}", ids))
        for message in sent:
            if isinstance(message, m.GroupRoster):
                assert set(message.keys) == graph[message.receiver] | {message.receiver}
                assert message.members == ((1, n),) and message.advertised == n  # one run: 8 bytes for n ids
            if isinstance(message, m.GroupUnmaskRequest):
                assert message.survivors == ((1, n),) and message.dropped == () and message.included == n
        received[n] = (config.degree, np.mean([result.transcript.bytes_out(c) for c in range(1, 51)]))
    (k1, b1), (k2, b2) = received[200], received[800]
    assert b2 / b1 < 1.05 * (k2 + 1) / (k1 + 1)  # per-client bytes follow the degree (n grew 4x)
    full = SecAggConfig(num_clients=800, graph="harary")
    result = aggregate({c: [np.zeros(16)] for c in range(1, 801)}, full, round_id="bytes-full")
    assert np.mean([result.transcript.bytes_out(c) for c in range(1, 51)]) > 5 * b2  # the full roster is O(n)


class GroupRound:
    """A round driven by hand up to the roster (sparse ring of degree 4 and group rosters unless told otherwise)."""

    def __init__(self, n=12, round_id="group-round", **settings):
        self.config = SecAggConfig(num_clients=n, **{"graph": "harary", "neighbours": 4, "roster": "group",
                                                     **settings})
        self.layout = PayloadLayout(((3,),), self.config)
        self.round_id = round_id
        self.clients = {c: SecAggClient(c, self.config, round_id, self.layout) for c in range(1, n + 1)}
        self.server = SecAggServer(self.config, round_id, self.layout)
        for cid, client in self.clients.items():
            self.server.receive_advertise(client.advertise_keys(), peer=cid)

    def to_masked(self, skip=()):
        self.rosters = self.server.group_rosters()
        for cid, client in self.clients.items():
            self.server.receive_share_keys(client.share_keys(self.rosters[cid]), peer=cid)
        bundles = self.server.forward_shares()
        for cid, client in self.clients.items():
            if cid not in skip:
                self.server.receive_masked_input(client.masked_input(bundles[cid], [np.full(3, cid / 4)]), peer=cid)
        return self


def test_the_roster_form_is_fixed_by_the_config():
    r = GroupRound()
    with pytest.raises(WrongStage, match="roster is 'group'"):
        r.server.key_roster()
    rosters = r.server.group_rosters()
    full = m.KeyRoster(round_id=r.round_id, sender=0, keys=dict(rosters[1].keys))
    with pytest.raises(WrongStage, match="expected a GroupRoster"):
        r.clients[1].share_keys(full)
    assert r.clients[1].stage == "advertised"  # refused before the stage moved


def test_a_roster_for_another_client_or_another_graph_is_refused():
    r = GroupRound()
    rosters = r.server.group_rosters()
    with pytest.raises(UnknownSender, match="delivered to client 1"):
        r.clients[1].share_keys(rosters[2])
    mine = rosters[3]
    shrunk = dict(mine.keys)
    shrunk.pop(next(c for c in shrunk if c != 3))  # a server hiding one neighbour (a smaller group, lower t)
    with pytest.raises(MalformedMessage, match="not client 3's group"):
        r.clients[3].share_keys(mine.model_copy(update={"keys": shrunk}))
    # a graph the server made up: client 4 with neighbours of the server's choosing, each with its real keys
    every = {c: rosters[c].keys[c] for c in rosters}
    outsiders = sorted(set(every) - set(rosters[4].keys))[:4]  # none of them a neighbour on the real ring
    chosen = {4: every[4], **{c: every[c] for c in outsiders}}
    with pytest.raises(MalformedMessage, match="not client 4's group"):
        r.clients[4].share_keys(rosters[4].model_copy(update={"keys": chosen}))
    # a roster whose ids make another graph (one id left out): the keys no longer match the group it gives
    with pytest.raises(MalformedMessage, match="not client 6's group"):
        r.clients[6].share_keys(rosters[6].model_copy(update={"members": ((1, 11),) if 12 not in rosters[6].keys
                                                              else ((2, 11),)}))
    with pytest.raises(MalformedMessage, match="at most 12"):
        r.clients[7].share_keys(rosters[7].model_copy(update={"members": ((1, 13),)}))
    with pytest.raises(UnknownSender, match="does not list client 8"):
        r.clients[8].share_keys(rosters[8].model_copy(update={"members": ((1, 7), (9, 4))}))
    # the encoding round-trips and is checked like every message; id runs must be canonical
    assert m.decode(mine.to_bytes()) == mine
    with pytest.raises(MalformedMessage):
        m.decode(mine.to_bytes()[:-3])
    overlapping = m.GroupRoster.model_construct(round_id=mine.round_id, sender=0, version=mine.version,
                                                receiver=3, members=((1, 6), (6, 7)), keys=mine.keys)
    with pytest.raises(MalformedMessage, match="canonical"):
        m.decode(overlapping.to_bytes())


def test_the_server_cannot_split_the_round_into_separately_unmasked_parts():
    """The reviewer's attack on a server-chosen graph: 9 clients cut into three triangles, each unmasked on its
    own. Every client derives its group from the roster's ids, so a triangle roster is refused."""
    r = GroupRound(9, "split", neighbours=2)
    clients, server = r.clients, r.server
    honest = server.group_rosters()
    keys = {c: honest[c].keys[c] for c in honest}
    refused = 0
    for c in clients:
        first = (c - 1) // 3 * 3 + 1
        triangle = m.GroupRoster(round_id="split", sender=0, receiver=c, members=honest[c].members,
                                 keys={v: keys[v] for v in range(first, first + 3)})
        if set(triangle.keys) == set(honest[c].keys):
            continue  # this client's ring group happens to be its triangle
        with pytest.raises(MalformedMessage):
            clients[c].share_keys(triangle)
        refused += 1
    assert refused >= 3


def test_the_group_unmask_request_is_checked_like_the_full_one():
    r = GroupRound().to_masked(skip={5})
    requests = r.server.group_unmask_requests()
    assert 5 not in requests
    assert all(x.included == 11 and x.survivors == ((1, 4), (6, 7)) for x in requests.values())
    client, honest = next((c, x) for c, x in requests.items() if 5 in x.dropped)  # a neighbour of the dropout
    greedy = honest.model_copy(update={"survivors": ((1, 12),)})  # 5 both survived and dropped
    with pytest.raises(UnsafeUnmaskRequest, match="both survived and dropped"):
        r.clients[client].unmask(greedy)
    fresh = GroupRound(round_id="group-round-2").to_masked(skip={5})
    requests = fresh.server.group_unmask_requests()
    outsider = next(c for c in range(1, 13) if c not in fresh.server._neighbours[1] | {1})
    with pytest.raises(MalformedMessage, match="outside"):
        fresh.clients[1].unmask(requests[1].model_copy(update={"dropped": (outsider,)}))
    with pytest.raises(UnsafeUnmaskRequest, match="the roster did not"):  # padding the count with made-up inputs
        fresh.clients[2].unmask(requests[2].model_copy(update={"survivors": ((1, 4), (6, 7), (1001, 6))}))
    with pytest.raises(UnknownSender, match="delivered to client 3"):
        fresh.clients[3].unmask(requests[4])


def test_min_inputs_counts_survivors_the_roster_listed():
    r = GroupRound(min_inputs=11).to_masked()
    requests = r.server.group_unmask_requests()
    with pytest.raises(RoundAborted, match="fewer than the minimum 11"):
        r.clients[1].unmask(requests[1].model_copy(update={"survivors": ((1, 10),)}))
    assert isinstance(r.clients[2].unmask(requests[2]), m.UnmaskResponse)


def test_the_full_request_counts_distinct_listed_survivors():
    r = GroupRound(8, "full", graph="complete", neighbours=None, roster="full", min_inputs=6)
    clients, server = r.clients, r.server
    roster = server.key_roster()
    for cid, client in clients.items():
        server.receive_share_keys(client.share_keys(roster), peer=cid)
    bundles = server.forward_shares()
    for cid in (1, 2, 3):
        server.receive_masked_input(clients[cid].masked_input(bundles[cid], [np.ones(3)]), peer=cid)
    padded = m.UnmaskRequest(round_id="full", sender=0, survivors=(1, 2, 3, 1001, 1002, 1003), dropped=())
    with pytest.raises(UnsafeUnmaskRequest, match="the roster did not"):
        clients[1].unmask(padded)
    repeated = m.UnmaskRequest.model_construct(round_id="full", sender=0, version=2, survivors=(1, 2, 3, 3, 3, 3),
                                               dropped=(4, 5, 6, 7, 8))
    with pytest.raises(RoundAborted, match="includes 3 inputs"):
        clients[2].unmask(repeated)


@settings(max_examples=40, deadline=None)
@given(ids=st.sets(st.integers(1, 300), min_size=3, max_size=120), half=st.integers(1, 8),
       round_id=st.text(min_size=1, max_size=8))
def test_one_clients_group_is_its_row_of_the_whole_graph(ids, half, round_id):
    from privfer.secagg.graph import client_group
    from privfer.secagg.idsets import id_runs

    members = id_runs(ids)
    graph = neighbourhoods(ids, 2 * half, graph_seed(round_id, ids))
    for client in sorted(ids)[:: max(1, len(ids) // 10)]:
        assert client_group(round_id, members, 2 * half, client) == graph[client] | {client}


def test_runs_passed_as_objects_are_checked_like_decoded_ones():
    r = GroupRound()
    rosters = r.server.group_rosters()
    doubled = rosters[1].model_copy(update={"members": ((1, 6), (1, 6))})  # bypasses the constructor's check
    with pytest.raises(MalformedMessage, match="canonical"):
        r.clients[1].share_keys(doubled)
    fresh = GroupRound(round_id="objects", min_inputs=10).to_masked()
    requests = fresh.server.group_unmask_requests()
    twice = requests[1].model_copy(update={"survivors": ((1, 6), (1, 6))})  # 6 survivors counted twice
    with pytest.raises(MalformedMessage, match="canonical"):
        fresh.clients[1].unmask(twice)


def test_a_restored_client_refuses_a_state_whose_roster_ids_do_not_hold_its_group():
    import json

    from privfer.secagg import CorruptState

    r = GroupRound()
    rosters = r.server.group_rosters()
    r.clients[1].share_keys(rosters[1])
    state = r.clients[1].export_state()
    document = json.loads(state[5:])
    assert SecAggClient.restore(state)._members == rosters[1].members
    for members in ([[20, 3]], [[True, 12]], [[1.5, 11]], [["1", "12"]], [[1, 6], [1, 6]]):
        with pytest.raises(CorruptState, match="members"):
            SecAggClient.restore(state[:5] + json.dumps({**document, "members": members}).encode())
