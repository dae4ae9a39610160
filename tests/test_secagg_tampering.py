"""Malicious clients against reconstruction: a tampered share never gives a wrong sum (SPEC sections 6.2, 6.4)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privfer.secagg import (
    InconsistentShares,
    MalformedMessage,
    PayloadLayout,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
)
from privfer.secagg import messages as m
from privfer.secagg.shamir import PRIME


def run_round(n, *, drop=(), tamper_response=None, tamper_share_keys=None, tamper_forwarded=None, seed=0,
              graph="complete"):
    """One round through the stage API and the byte encodings; the hooks rewrite one client's message."""
    config = SecAggConfig(num_clients=n, graph=graph, clipping_range=8.0)
    rng = np.random.default_rng(seed)
    updates = {c: [np.round(rng.uniform(-4, 4, 6) * 256) / 256] for c in range(1, n + 1)}
    layout = PayloadLayout.for_arrays(updates[1], config)
    clients = {c: SecAggClient(c, config, "tamper", layout) for c in updates}
    server = SecAggServer(config, "tamper", layout)
    for c, client in clients.items():
        server.receive_advertise(client.advertise_keys().to_bytes(), peer=c)
    roster = m.KeyRoster.from_bytes(server.key_roster().to_bytes())
    for c, client in clients.items():
        message = client.share_keys(roster)
        if tamper_share_keys is not None:
            message = tamper_share_keys(c, message)
        server.receive_share_keys(message.to_bytes(), peer=c)
    for c, bundle in server.forward_shares().items():
        if c in drop:
            continue
        if tamper_forwarded is not None:
            bundle = tamper_forwarded(c, bundle)
        masked = clients[c].masked_input(m.ForwardedShares.from_bytes(bundle.to_bytes()), updates[c])
        server.receive_masked_input(masked.to_bytes(), peer=c)
    request = m.UnmaskRequest.from_bytes(server.unmask_request().to_bytes())
    for c in request.survivors:
        raw = clients[c].unmask(request).to_bytes()
        if tamper_response is not None:
            raw = tamper_response(c, raw)
        server.receive_unmask(raw, peer=c)
    summed = server.finish()
    exact = sum(updates[c][0] for c in summed.included)
    return summed, exact, server


def rewrite_share(raw: bytes, table: str, owner: int, word: int, value: int) -> bytes:
    """The response with one 32-bit word of one share replaced (re-encoded: the bytes stay well-formed)."""
    response = m.UnmaskResponse.from_bytes(raw)
    shares = dict(getattr(response, table))
    share = bytearray(shares[owner])
    share[4 * word : 4 * word + 4] = int(value).to_bytes(4, "little")
    shares[owner] = bytes(share)
    fields = {"seed_shares": response.seed_shares, "key_shares": response.key_shares, table: shares}
    changed = m.UnmaskResponse.model_construct(round_id=response.round_id, sender=response.sender,
                                               version=response.version, **fields)
    return changed.to_bytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(4, 10), data=st.data())
def test_a_tampered_share_gives_the_exact_sum_or_a_secagg_error(n, data):
    """Fuzzed UnmaskResponses with valid-looking field elements: the sum is exact, or the round raises."""
    drop = set(data.draw(st.lists(st.integers(1, n), unique=True, max_size=1)))
    liars = set(data.draw(st.lists(st.sampled_from(sorted(set(range(1, n + 1)) - drop)), unique=True, min_size=1,
                                   max_size=max(1, n // 2))))
    table = "key_shares" if drop and data.draw(st.booleans()) else "seed_shares"
    word = data.draw(st.integers(0, 8))
    value = data.draw(st.integers(0, PRIME - 1))
    seed = data.draw(st.integers(0, 2**16))

    def tamper(sender, raw):
        if sender not in liars:
            return raw
        shares = getattr(m.UnmaskResponse.from_bytes(raw), table)
        owner = sorted(shares)[0] if shares else None
        if owner is None:
            return raw
        original = int.from_bytes(shares[owner][4 * word : 4 * word + 4], "little")
        return rewrite_share(raw, table, owner, word, value if value != original else (value + 1) % PRIME)

    try:
        summed, exact, server = run_round(n, drop=drop, tamper_response=tamper, seed=seed)
    except SecAggError as exc:
        if isinstance(exc, InconsistentShares):
            assert set(exc.senders) <= liars  # only the clients that tampered are named
        return
    np.testing.assert_array_equal(summed.decoded.arrays[0], exact)  # never a wrong sum
    assert set().union(*server.rejected.values()) <= liars


def test_one_tampered_share_is_set_aside_and_the_sum_stays_exact():
    def tamper(sender, raw):
        return rewrite_share(raw, "seed_shares", 1, 0, 12345) if sender == 2 else raw

    summed, exact, server = run_round(6, tamper_response=tamper)
    np.testing.assert_array_equal(summed.decoded.arrays[0], exact)
    assert server.rejected == {1: {2}}


def test_too_many_tampered_shares_abort_naming_the_senders():
    liars = {2, 3, 4}  # 6 clients, threshold 4: three bad shares of client 1's seed leave 3 verified

    def tamper(sender, raw):
        return rewrite_share(raw, "seed_shares", 1, 3, 777) if sender in liars else raw

    with pytest.raises(InconsistentShares, match="client 1's self-mask seed") as caught:
        run_round(6, tamper_response=tamper)
    assert set(caught.value.senders) == liars


def test_a_share_word_outside_the_field_is_malformed_at_receive_unmask():
    def tamper(sender, raw):
        return rewrite_share(raw, "seed_shares", 1, 0, PRIME + 5) if sender == 2 else raw

    with pytest.raises(MalformedMessage, match="not a field element"):
        run_round(5, tamper_response=tamper)


def test_a_dealer_whose_shares_do_not_reconstruct_its_commitment_is_named():
    def lie(sender, message):  # client 3 commits to another self-mask seed than the one it shared
        return message.model_copy(update={"seed_commitment": bytes(32)}) if sender == 3 else message

    with pytest.raises(InconsistentShares, match="client 3 dealt shares") as caught:
        run_round(5, tamper_share_keys=lie)
    assert caught.value.senders == (3,)


def test_a_holder_refuses_shares_that_differ_from_their_commitment():
    def alter(receiver, bundle):
        if receiver != 1:
            return bundle
        sender = sorted(bundle.commitments)[0]
        return bundle.model_copy(update={"commitments": {**bundle.commitments, sender: bytes(64)}})

    with pytest.raises(InconsistentShares, match="do not match its commitments"):
        run_round(5, tamper_forwarded=alter)


def test_share_commitments_cover_exactly_the_dealers_group():
    def short(sender, message):  # client 2 leaves its own share out of its commitments
        if sender != 2:
            return message
        return message.model_copy(update={"commitments": {h: c for h, c in message.commitments.items() if h != 2}})

    with pytest.raises(SecAggError, match="committed to shares for other clients"):
        run_round(5, tamper_share_keys=short)


def test_objects_are_checked_like_their_bytes():
    """A message object that bypassed its constructor is malformed, not a crash later in the round."""
    def short_commitment(sender, message):
        if sender != 2:
            return message
        return m.ShareKeys.model_construct(round_id=message.round_id, sender=2, version=message.version,
                                           ciphertexts=message.ciphertexts,
                                           commitments={**message.commitments, 2: bytes(63)},
                                           seed_commitment=message.seed_commitment)

    config = SecAggConfig(num_clients=4, graph="complete")
    layout = PayloadLayout.for_arrays([np.zeros(2)], config)
    clients = {c: SecAggClient(c, config, "objects", layout) for c in range(1, 5)}
    server = SecAggServer(config, "objects", layout)
    for c, client in clients.items():
        server.receive_advertise(client.advertise_keys(), peer=c)
    roster = server.key_roster()
    with pytest.raises(MalformedMessage):
        server.receive_share_keys(short_commitment(2, clients[2].share_keys(roster)), peer=2)
    old = clients[3].share_keys(roster)
    with pytest.raises(SecAggError):  # a version-1 object is refused like version-1 bytes
        server.receive_share_keys(old.model_copy(update={"version": 1}), peer=3)


def test_a_dealer_whose_verified_shares_rebuild_no_secret_is_named(monkeypatch):
    from privfer.secagg import shamir

    real = shamir.split

    def split(secrets, holders, threshold, randomness=None, **kwargs):
        shares = real(secrets, holders, threshold, randomness, **kwargs)
        # add the same constant to every share's first chunk: a consistent polynomial whose secret chunk is
        # out of range (still field elements, and committed honestly)
        shares[:, 0, 0] = (shares[:, 0, 0] + np.uint64((1 << 30) + 5)) % np.uint64(PRIME)
        return shares

    dealer = {"done": False}

    def once(*args, **kwargs):
        if dealer["done"]:
            return real(*args, **kwargs)
        dealer["done"] = True
        return split(*args, **kwargs)

    monkeypatch.setattr(shamir, "split", once)
    with pytest.raises(InconsistentShares) as caught:
        run_round(5)
    assert caught.value.senders == (1,)
