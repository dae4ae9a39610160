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
                assert message.advertised == n
            if isinstance(message, m.GroupUnmaskRequest):
                assert set(message.survivors) == graph[message.receiver] | {message.receiver}
                assert message.included == n
        received[n] = (config.degree, np.mean([result.transcript.bytes_out(c) for c in range(1, 51)]))
    (k1, b1), (k2, b2) = received[200], received[800]
    assert b2 / b1 < 1.05 * (k2 + 1) / (k1 + 1)  # per-client bytes follow the degree (n grew 4x)
    full = SecAggConfig(num_clients=800, graph="harary")
    result = aggregate({c: [np.zeros(16)] for c in range(1, 801)}, full, round_id="bytes-full")
    assert np.mean([result.transcript.bytes_out(c) for c in range(1, 51)]) > 5 * b2  # the full roster is O(n)


class GroupRound:
    def __init__(self, n=12, round_id="group-round", **settings):
        self.config = SecAggConfig(num_clients=n, graph="harary", neighbours=4, roster="group", **settings)
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


def test_a_roster_for_another_client_or_of_the_wrong_size_is_refused():
    r = GroupRound()
    rosters = r.server.group_rosters()
    with pytest.raises(UnknownSender, match="delivered to client 1"):
        r.clients[1].share_keys(rosters[2])
    mine = rosters[3]
    shrunk = dict(mine.keys)
    shrunk.pop(next(c for c in shrunk if c != 3))  # a server hiding one neighbour (a smaller group, lower t)
    with pytest.raises(MalformedMessage, match="gives every group 5"):
        r.clients[3].share_keys(m.GroupRoster(round_id=r.round_id, sender=0, receiver=3, advertised=12, keys=shrunk))
    with pytest.raises(MalformedMessage, match="at most 12"):
        r.clients[4].share_keys(m.GroupRoster(round_id=r.round_id, sender=0, receiver=4, advertised=13,
                                              keys=dict(rosters[4].keys)))
    # the encoding round-trips and is checked like every message
    assert m.decode(mine.to_bytes()) == mine
    with pytest.raises(MalformedMessage):
        m.decode(mine.to_bytes()[:-3])


def test_the_group_unmask_request_is_checked_like_the_full_one():
    r = GroupRound().to_masked(skip={5})
    requests = r.server.group_unmask_requests()
    assert 5 not in requests
    assert all(x.included == 11 for x in requests.values())
    client, honest = next((c, x) for c, x in requests.items() if 5 in x.dropped)  # a neighbour of the dropout
    group = set(honest.survivors) | set(honest.dropped)
    greedy = honest.model_copy(update={"survivors": tuple(sorted(group))})
    with pytest.raises(UnsafeUnmaskRequest, match="both survived and dropped"):
        r.clients[client].unmask(greedy)
    fresh = GroupRound(round_id="group-round-2").to_masked(skip={5})
    requests = fresh.server.group_unmask_requests()
    outsider = next(c for c in range(1, 13) if c not in set(requests[1].survivors) | set(requests[1].dropped))
    with pytest.raises(MalformedMessage, match="outside"):
        fresh.clients[1].unmask(requests[1].model_copy(update={"survivors": tuple(sorted({*requests[1].survivors,
                                                                                           outsider}))}))
    with pytest.raises(UnsafeUnmaskRequest, match="inputs are included"):
        fresh.clients[2].unmask(requests[2].model_copy(update={"included": 1}))
    with pytest.raises(UnknownSender, match="delivered to client 3"):
        fresh.clients[3].unmask(requests[4])


def test_min_inputs_counts_the_stated_inclusions():
    r = GroupRound(min_inputs=11).to_masked()
    requests = r.server.group_unmask_requests()
    with pytest.raises(RoundAborted, match="fewer than the minimum 11"):
        r.clients[1].unmask(requests[1].model_copy(update={"included": 10}))
    assert isinstance(r.clients[2].unmask(requests[2]), m.UnmaskResponse)
