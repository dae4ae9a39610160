"""Whole secure-aggregation rounds: exact sums after dropouts, aborts, adversarial requests, the server's view."""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privfer.secagg import (
    STAGES,
    DuplicateSender,
    PayloadLayout,
    RoundAborted,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    ShareAuthenticationError,
    UnknownSender,
    UnsafeUnmaskRequest,
    WrongRound,
    WrongStage,
    WrongVectorLength,
    aggregate,
)
from privfer.secagg import messages as m
from privfer.secagg.quantize import ClippingWarning


def grid_updates(rng, n, shapes, precision):
    """Updates on the fixed-point grid: stochastic rounding is then exact, so sums must be exact too."""
    return {
        cid: [np.round(rng.uniform(-4, 4, shape) * 2.0**precision) / 2.0**precision for shape in shapes]
        for cid in range(1, n + 1)
    }


@st.composite
def rounds(draw):
    n = draw(st.integers(3, 40))
    graph = draw(st.sampled_from(["complete", "harary"])) if n >= 5 else "complete"
    fraction = draw(st.sampled_from([0.51, 2 / 3, 0.8]))
    bits = draw(st.sampled_from([32, 64]))
    config = SecAggConfig(num_clients=n, graph=graph, threshold_fraction=fraction, modulus_bits=bits)
    shapes = draw(st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3))
    # on a sparse graph each client needs t of its group alive, so drop few there
    limit = n - config.group_threshold if graph == "complete" else max(0, (config.group_size - config.group_threshold) // 2)
    dropped = draw(st.lists(st.integers(1, n), unique=True, max_size=limit))
    stages = {cid: draw(st.sampled_from(STAGES)) for cid in dropped}
    return config, shapes, stages, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds())
def test_sum_is_exact_after_dropouts_at_any_stage(case):
    config, shapes, dropouts, seed = case
    rng = np.random.default_rng(seed)
    updates = grid_updates(rng, config.num_clients, shapes, min(config.update_precision_bits, 30))
    counts = {cid: int(rng.integers(1, 1000)) for cid in updates}
    result = aggregate(updates, config, dropouts, example_counts=counts)
    expected_in = sorted(c for c in updates if dropouts.get(c) not in ("advertise_keys", "share_keys", "masked_input"))
    assert result.included == expected_in
    for k, shape in enumerate(shapes):
        exact = sum(updates[c][k] for c in expected_in)
        assert result.total[k].shape == shape
        np.testing.assert_array_equal(result.total[k], exact)  # exact in the integer domain
    assert result.example_count == sum(counts[c] for c in expected_in)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(3, 25), seed=st.integers(0, 2**32 - 1))
def test_float_sum_within_the_quantization_bound(n, seed):
    rng = np.random.default_rng(seed)
    config = SecAggConfig(num_clients=n, clipping_range=2.0)
    # inside the clipping range (a 4-sigma draw would be clipped, and clipping is not quantization error)
    updates = {cid: [np.clip(rng.normal(0, 0.5, shape), -1.99, 1.99) for shape in ((7,), (2, 3))]
               for cid in range(1, n + 1)}
    result = aggregate(updates, config, {1: "masked_input"})
    for k in range(2):
        exact = sum(updates[c][k] for c in result.included)
        assert np.max(np.abs(result.total[k] - exact)) <= result.error_bound


@pytest.mark.parametrize("stage", ["advertise_keys", "share_keys", "masked_input"])
def test_too_few_survivors_abort_without_a_partial_sum(stage):
    config = SecAggConfig(num_clients=6)  # threshold 4
    updates = {cid: [np.ones(3)] for cid in range(1, 7)}
    with pytest.raises(RoundAborted, match="the threshold is 4"):
        aggregate(updates, config, {1: stage, 2: stage, 3: stage})


def test_too_few_unmask_answers_abort():
    config = SecAggConfig(num_clients=6)
    updates = {cid: [np.ones(3)] for cid in range(1, 7)}
    with pytest.raises(RoundAborted):
        aggregate(updates, config, {1: "unmask", 2: "unmask", 3: "unmask"})


def test_metrics_and_counts_are_summed_not_revealed():
    config = SecAggConfig(num_clients=4, metrics=("loss", "accuracy"), metric_range=100.0)
    updates = {cid: [np.full(2, float(cid))] for cid in range(1, 5)}
    metrics = {cid: {"loss": 0.5 * cid, "accuracy": 0.1 * cid} for cid in updates}
    result = aggregate(updates, config, example_counts={1: 10, 2: 20, 3: 30, 4: 40}, metrics=metrics)
    assert result.example_count == 100
    assert result.metrics["loss"] == pytest.approx(5.0, abs=1e-6)
    assert result.metrics["accuracy"] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(result.total[0], [10.0, 10.0], atol=result.error_bound)


def test_clipping_is_reported_in_the_result():
    config = SecAggConfig(num_clients=3, clipping_range=1.0)
    updates = {1: [np.array([0.5, 3.0])], 2: [np.array([0.1, 0.2])], 3: [np.array([-5.0, 0.0])]}
    with pytest.warns(ClippingWarning, match="2 of 6 values of the included clients"):
        result = aggregate(updates, config)
    # only the securely summed count is known: not which client clipped, nor its largest value
    assert (result.clipping.clipped, result.clipping.total, result.clipping.max_abs) == (2, 6, None)
    np.testing.assert_allclose(result.total[0], [0.5 + 0.1 - 1.0, 1.0 + 0.2], atol=1e-5)


def test_mismatched_shapes_are_refused():
    from privfer.secagg import ShapeMismatch

    with pytest.raises(ShapeMismatch):
        aggregate({1: [np.ones(3)], 2: [np.ones(4)], 3: [np.ones(3)]}, SecAggConfig(num_clients=3))


# -- a round driven by hand, for adversarial checks ---------------------------------------------------

class Round:
    def __init__(self, n=5, round_id="round-1", **settings):
        self.config = SecAggConfig(num_clients=n, **settings)
        self.layout = PayloadLayout(((4,),), self.config)
        self.round_id = round_id
        self.clients = {c: SecAggClient(c, self.config, round_id, self.layout) for c in range(1, n + 1)}
        self.server = SecAggServer(self.config, round_id, self.layout)

    def to_forwarded(self):
        for cid, client in self.clients.items():
            self.server.receive_advertise(client.advertise_keys(), peer=cid)
        self.roster = self.server.key_roster()
        for cid, client in self.clients.items():
            self.server.receive_share_keys(client.share_keys(self.roster), peer=cid)
        return self.server.forward_shares()

    def to_masked(self, skip_masked=()):
        for cid, client in self.clients.items():
            self.server.receive_advertise(client.advertise_keys().to_bytes(), peer=cid)
        self.roster = self.server.key_roster()
        for cid, client in self.clients.items():
            self.server.receive_share_keys(client.share_keys(self.roster).to_bytes(), peer=cid)
        self.bundles = self.server.forward_shares()
        for cid, client in self.clients.items():
            if cid not in skip_masked:
                self.server.receive_masked_input(client.masked_input(self.bundles[cid], [np.full(4, cid / 10)]),
                                                 peer=cid)
        return self


def test_a_request_for_both_shares_of_a_peer_is_refused():
    r = Round().to_masked(skip_masked={5})
    greedy = m.UnmaskRequest(round_id=r.round_id, sender=0, survivors=(1, 2, 3, 4, 5), dropped=(5,))
    with pytest.raises(UnsafeUnmaskRequest, match="both survived and dropped"):
        r.clients[1].unmask(greedy)


def test_a_second_unmask_request_is_refused():
    r = Round().to_masked(skip_masked={5})
    honest = r.server.unmask_request()
    r.clients[1].unmask(honest)
    # the server now pretends client 4 dropped, hoping for its mask key after its self-mask seed
    other = m.UnmaskRequest(round_id=r.round_id, sender=0, survivors=(1, 2, 3), dropped=(4, 5))
    with pytest.raises(WrongStage):
        r.clients[1].unmask(other)


def test_a_client_listed_as_dropped_after_sending_refuses():
    r = Round().to_masked()
    lie = m.UnmaskRequest(round_id=r.round_id, sender=0, survivors=(2, 3, 4, 5), dropped=(1,))
    with pytest.raises(UnsafeUnmaskRequest, match="not listed as a survivor"):
        r.clients[1].unmask(lie)


def test_a_client_aborts_when_too_few_of_its_group_survive():
    r = Round().to_masked()
    thin = m.UnmaskRequest(round_id=r.round_id, sender=0, survivors=(1, 2), dropped=(3, 4, 5))
    with pytest.raises(RoundAborted, match="threshold"):
        r.clients[1].unmask(thin)


def tampered_bundle(r):
    """Client 1's forwarded shares with one bit of one share's ciphertext flipped; and whose share it was."""
    bundle = r.to_forwarded()[1]
    sender = next(iter(bundle.ciphertexts))
    blob = bytearray(bundle.ciphertexts[sender])
    blob[20] ^= 0x40
    forged = m.ForwardedShares(round_id=r.round_id, sender=0, receiver=1,
                               ciphertexts={**bundle.ciphertexts, sender: bytes(blob)}, commitments=bundle.commitments)
    return forged, sender


def test_a_tampered_share_fails_authentication():
    r = Round()
    forged, sender = tampered_bundle(r)
    with pytest.raises(ShareAuthenticationError, match=f"share from client {sender} to 1"):
        r.clients[1].masked_input(forged, [np.zeros(4)])


def test_a_share_redirected_to_another_client_fails_authentication():
    r = Round()
    bundles = r.to_forwarded()
    # client 3's share meant for client 2, handed to client 1 as if from 3
    stolen = {**bundles[1].ciphertexts, 3: bundles[2].ciphertexts[3]}
    with pytest.raises(ShareAuthenticationError):
        r.clients[1].masked_input(m.ForwardedShares(round_id=r.round_id, sender=0, receiver=1, ciphertexts=stolen,
                                                    commitments={**bundles[1].commitments,
                                                                 3: bundles[2].commitments[3]}),
                                  [np.zeros(4)])


def test_replayed_and_cross_round_messages_are_rejected():
    old = Round(round_id="round-1")
    advert = old.clients[1].advertise_keys().to_bytes()
    new = Round(round_id="round-2")
    with pytest.raises(WrongRound):
        new.server.receive_advertise(advert, peer=1)
    new.server.receive_advertise(new.clients[1].advertise_keys().to_bytes(), peer=1)
    with pytest.raises(DuplicateSender):
        new.server.receive_advertise(new.server.transcript.entries[0].message, peer=1)  # the same message again


def test_server_rejects_unknown_senders_and_wrong_lengths():
    r = Round()
    for cid, client in r.clients.items():
        r.server.receive_advertise(client.advertise_keys(), peer=cid)
    roster = r.server.key_roster()
    stranger = m.ShareKeys(round_id=r.round_id, sender=99, ciphertexts={}, commitments={}, seed_commitment=bytes(32))
    with pytest.raises(UnknownSender):
        r.server.receive_share_keys(stranger, peer=99)
    for cid, client in r.clients.items():
        r.server.receive_share_keys(client.share_keys(roster), peer=cid)
    bundles = r.server.forward_shares()
    short = m.MaskedInput(round_id=r.round_id, sender=1, modulus_bits=32, vector=np.zeros(3, np.uint32))
    with pytest.raises(WrongVectorLength):
        r.server.receive_masked_input(short, peer=1)
    with pytest.raises(WrongStage):
        r.server.receive_advertise(m.AdvertiseKeys(
            round_id=r.round_id, sender=7, c_public=b"\x09" * 32, s_public=b"\x08" * 32), peer=7)
    with pytest.raises(WrongStage):
        r.clients[1].share_keys(roster)  # a stage cannot be repeated
    assert bundles


# -- what the server sees ------------------------------------------------------------------------------

def chi_square_uniform(words: np.ndarray, bins: int = 256) -> float:
    """Pearson's statistic of the words' top bytes against a uniform distribution."""
    top = (words.astype(np.uint64) >> np.uint64(24)).astype(np.int64) if words.dtype == np.uint32 else (
        words >> np.uint64(56)).astype(np.int64)
    counts = np.bincount(top, minlength=bins)
    expected = words.size / bins
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("graph", ["complete", "harary"])
def test_masked_vectors_look_uniform_whatever_the_input(graph):
    n, d = 8, 40_000
    config = SecAggConfig(num_clients=n, graph=graph)
    zeros = {cid: [np.zeros(d)] for cid in range(1, n + 1)}
    constant = {cid: [np.full(d, 7.5)] for cid in range(1, n + 1)}
    # chi-square with 255 degrees of freedom: 377 is its 1 - 1e-6 quantile, so the 28 checks of a run (2 graphs x
    # 2 inputs x 7 vectors) fail by chance about once in 36,000 runs (at 99.9% each, 330, a run failed 1 in 36);
    # a vector that kept any structure of its input lands in the thousands
    for updates in (zeros, constant):
        result = aggregate(updates, config, {2: "masked_input"})
        for message in result.transcript.received(m.MaskedInput):
            assert chi_square_uniform(message.vector) < 377
    # and the masked vectors of the same client under two inputs are uncorrelated with the inputs
    seen = aggregate(constant, config).transcript.received(m.MaskedInput)[0].vector.astype(np.float64)
    assert abs(np.corrcoef(seen[:d], np.arange(d))[0, 1]) < 0.03


def test_the_server_never_receives_a_plaintext_or_both_shares_of_anyone():
    n = 7
    config = SecAggConfig(num_clients=n)
    updates = {cid: [np.full(5, float(cid))] for cid in range(1, n + 1)}
    result = aggregate(updates, config, {3: "masked_input", 6: "unmask"})
    kinds = {type(msg) for msg in result.transcript.received()}
    assert kinds == {m.AdvertiseKeys, m.ShareKeys, m.MaskedInput, m.UnmaskResponse}
    plain_words = [np.asarray(u[0]) for u in updates.values()]
    for msg in result.transcript.received(m.MaskedInput):
        assert not any(np.allclose(msg.vector[:5].astype(float), p) for p in plain_words)
    seed_owners = {o for r in result.transcript.received(m.UnmaskResponse) for o in r.seed_shares}
    key_owners = {o for r in result.transcript.received(m.UnmaskResponse) for o in r.key_shares}
    assert seed_owners.isdisjoint(key_owners)
    assert key_owners == {3} and 6 in seed_owners
    assert result.included == [1, 2, 4, 5, 6, 7]


def test_the_documented_examples_run():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "secure-aggregation.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 4
    for block in blocks:
        exec(compile(block, "docs/secure-aggregation.md", "exec"), {})


def test_dropouts_cannot_cut_the_sparse_ring_into_revealed_segments():
    # A server that declares k/2 ring-consecutive clients "dropped" would split the
    # survivors into segments whose sums it could unmask separately; with t >= k/2 + 2
    # the survivors next to the cut refuse.
    from privfer.secagg.graph import graph_seed, ring_order

    r = Round(n=15, graph="harary", neighbours=4)
    assert r.config.group_threshold == 4
    r.to_masked()
    ring = ring_order(sorted(r.clients), graph_seed(r.round_id, r.roster.keys))
    cut = (ring[0], ring[1])
    lie = m.UnmaskRequest(round_id=r.round_id, sender=0,
                          survivors=tuple(sorted(set(ring) - set(cut))), dropped=tuple(sorted(cut)))
    with pytest.raises(RoundAborted, match="3 of its group survived, the threshold is 4"):
        r.clients[ring[2]].unmask(lie)


def test_server_rejects_bad_key_advertisements():
    r = Round()
    first = r.clients[1].advertise_keys()
    r.server.receive_advertise(first, peer=1)
    with pytest.raises(UnknownSender, match="sender 0"):
        r.server.receive_advertise(m.AdvertiseKeys(round_id=r.round_id, sender=0, c_public=b"\x05" * 32,
                                                   s_public=b"\x06" * 32), peer=None)  # an unauthenticated channel
    with pytest.raises(DuplicateSender, match="reuses a public key"):
        r.server.receive_advertise(m.AdvertiseKeys(round_id=r.round_id, sender=2, c_public=first.s_public,
                                                   s_public=r.clients[2].advertise_keys().s_public), peer=2)
    low_order = bytes(32)  # the identity point: every shared secret would be zero
    from privfer.secagg import MalformedMessage

    with pytest.raises(MalformedMessage, match="low-order"):
        r.server.receive_advertise(m.AdvertiseKeys(round_id=r.round_id, sender=3, c_public=low_order,
                                                   s_public=r.clients[3].advertise_keys().s_public), peer=3)
    with pytest.raises(UnknownSender, match="channel of client 5"):
        r.server.receive_advertise(r.clients[4].advertise_keys(), peer=5)


def test_a_client_that_failed_a_stage_takes_no_further_part():
    """A protocol failure ends the client's round (its own bad input does not: tests/test_secagg_inputs.py)."""
    r = Round()
    forged, sender = tampered_bundle(r)
    with pytest.raises(ShareAuthenticationError):
        r.clients[1].masked_input(forged, [np.zeros(4)])
    assert r.clients[1].stage == "aborted"
    with pytest.raises(WrongStage):
        r.clients[1].unmask(m.UnmaskRequest(round_id=r.round_id, sender=0, survivors=(1, 2, 3, 4, 5), dropped=()))
