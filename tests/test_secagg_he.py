"""The CKKS backend: sums within the stated bound, roles without the secret key, checks on every message."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tenseal as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from privfer.errors import ConfigError
from privfer.secagg import DuplicateSender, MalformedMessage, RoundAborted, WrongRound, WrongVectorLength, aggregate
from privfer.secagg.identity import enroll_in_process
from privfer.secagg.he import (
    seal_update,
    update_statement,
    HEClient,
    HELayout,
    HEMessage,
    HEServer,
    InvalidCiphertext,
    KeyAuthority,
    parse_chunks,
    make_ckks_config,
)


ENROLLED = enroll_in_process(range(1, 11), study="ckks-tests")  # an enrollment authority that is not the server
CERT = ENROLLED[1].certificate


SEALS: dict[bytes, bytes] = {}  # public context -> its key authority's sealing key (a trusted channel)


def make_authority(config):
    authority = KeyAuthority(config, CERT)
    SEALS[authority.public_context()] = authority.sealing_key
    return authority


def he_client(cid, public, layout, round_id):
    return HEClient(cid, public, layout, round_id, ENROLLED[cid], SEALS[public])


def signed_sealed(public, cid, round_id, chunks):
    """A client's update made by hand: raw CKKS chunks sealed to the key authority and signed by member ``cid``."""
    sealed = (seal_update(SEALS[public], round_id, cid, chunks),)
    return HEMessage(kind="update", round_id=round_id, sender=cid, ciphertexts=sealed,
                     signature=ENROLLED[cid].identity.sign(update_statement(CERT.study, round_id, cid, sealed)))


@pytest.fixture()
def authority():
    return make_authority(make_ckks_config(num_clients=5, min_clients=3))


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(2, 7),
    shapes=st.lists(st.lists(st.integers(1, 40), max_size=2).map(tuple), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_decrypted_sum_matches_the_float_sum(n, shapes, seed, data):
    rng = np.random.default_rng(seed)
    config = make_ckks_config(num_clients=n, min_clients=2, metrics=("loss",))
    updates = {cid: [rng.uniform(-8, 8, shape) for shape in shapes] for cid in range(1, n + 1)}
    dropped = data.draw(st.lists(st.integers(1, n), unique=True, max_size=n - 2))  # at least min_clients = 2 stay
    stage = data.draw(st.sampled_from(["advertise_keys", "masked_input", "unmask"]))
    counts = {cid: int(rng.integers(0, 100)) for cid in updates}
    result = aggregate(updates, config, {c: stage for c in dropped}, example_counts=counts,
                       metrics={c: {"loss": float(c)} for c in updates})
    included = [c for c in updates if c not in dropped or stage == "unmask"]
    assert result.included == included
    for k, shape in enumerate(shapes):
        assert result.total[k].shape == shape
        exact = sum(updates[c][k] for c in included)
        assert np.max(np.abs(result.total[k] - exact)) <= result.error_bound
    assert result.example_count == sum(counts[c] for c in included)
    assert result.metrics["loss"] == pytest.approx(sum(included), abs=result.error_bound * 1e3)


def test_models_larger_than_one_ciphertext_are_chunked_without_tenseal_warnings():
    config = make_ckks_config(num_clients=2, min_clients=2)
    updates = {1: [np.full((100, 95), 0.5)], 2: [np.full((100, 95), -0.25)]}  # 9,500 values: 3 chunks of 4,096
    assert HELayout.for_arrays(updates[1], config).chunks == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = aggregate(updates, config)
    np.testing.assert_allclose(result.total[0], 0.25, atol=result.error_bound)


def test_public_contexts_hold_no_secret_key(authority):
    public = authority.public_context()
    context = ts.context_from(public)
    assert not context.has_secret_key() and not context.is_private()
    vector = ts.ckks_vector(context, [1.0, 2.0])
    with pytest.raises(ValueError, match="secret"):
        vector.decrypt()
    layout = HELayout(((2,),), authority.config)
    client = he_client(1, public, layout, "r")
    server = HEServer(public, layout, "r", authority.config)
    for holder in (client.context, server.context):
        with pytest.raises(ValueError, match="secret"):
            ts.ckks_vector_from(holder, vector.serialize()).decrypt()
    secret_context = authority._context.serialize(save_secret_key=True)
    with pytest.raises(ValueError, match="public context"):
        HEClient(1, secret_context, layout, "r", ENROLLED[1], authority.sealing_key)
    with pytest.raises(ValueError, match="enrollment"):
        HEClient(1, public, layout, "r", ENROLLED[2], SEALS[public])
    with pytest.raises(ValueError, match="public context"):
        HEServer(secret_context, layout, "r", authority.config)


def _round(authority, n=4, round_id="r"):
    layout = HELayout(((3,),), authority.config)
    public = authority.public_context()
    server = HEServer(public, layout, round_id, authority.config)
    messages = {cid: he_client(cid, public, layout, round_id).encrypt([np.full(3, float(cid))]) for cid in range(1, n + 1)}
    return layout, server, messages


def test_bad_ciphertext_bytes_raise_a_specific_error(authority):
    layout, server, messages = _round(authority)
    # the server sees sealed bytes only; the key authority opens them and leaves out what is not CKKS
    for cid in (2, 3, 4):
        server.receive(messages[cid])
    server.receive(signed_sealed(authority.public_context(), 1, "r", [b"not a ciphertext"]))
    plain = authority.decrypt(server.bundle(), layout, "r")
    assert plain.included == (2, 3, 4) and authority.rejected == {1}
    with pytest.raises(InvalidCiphertext, match="client 1 sent"):
        parse_chunks(ts.context_from(authority.public_context()), [b"not a ciphertext"], layout, "client 1")
    for broken in (b"", b"PFHE", messages[2].to_bytes()[:-5], b"XXXX" + messages[2].to_bytes()[4:]):
        with pytest.raises(MalformedMessage):
            server.receive(broken)


def test_server_checks_round_duplicates_and_length(authority):
    layout, server, messages = _round(authority)
    server.receive(messages[1].to_bytes())
    with pytest.raises(DuplicateSender):
        server.receive(messages[1].to_bytes())
    _, _, other_round = _round(authority, round_id="r-old")
    with pytest.raises(WrongRound):
        server.receive(other_round[2].to_bytes())
    two_blobs = messages[3].model_copy(update={"ciphertexts": messages[3].ciphertexts * 2})
    with pytest.raises(WrongVectorLength):
        server.receive(two_blobs)


def test_key_authority_refuses_small_or_inflated_aggregates(authority):
    layout, server, messages = _round(authority)
    for cid in (1, 2):
        server.receive(messages[cid])
    small = server.bundle()
    with pytest.raises(RoundAborted, match="at least 3"):
        authority.decrypt(small.to_bytes(), layout, "r")
    # the server claims four clients but forwards two updates, or lists clients whose updates it does not carry
    inflated = HEMessage(kind="bundle", round_id="r", sender=0, included=(1, 2, 3, 4), updates=small.updates)
    with pytest.raises(RoundAborted, match="at least 3"):
        authority.decrypt(inflated, layout, "r")
    mislabelled = HEMessage(kind="bundle", round_id="r", sender=0, included=(1, 2, 4),
                            updates=(*small.updates, messages[3].to_bytes()))
    with pytest.raises(MalformedMessage, match="not the senders"):  # found before decrypting: "r" stays open
        authority.decrypt(mislabelled, layout, "r")
    server.receive(messages[3])
    plain = authority.decrypt(server.bundle().to_bytes(), layout, "r")
    assert plain.included == (1, 2, 3)
    np.testing.assert_allclose(plain.arrays[0], 6.0, atol=1e-6)
    with pytest.raises(WrongRound):
        authority.decrypt(server.bundle(), layout, "another")
    # one release per round: a second subset of the same round could be subtracted from the first
    server.receive(messages[4])
    with pytest.raises(RoundAborted, match="already decrypted"):
        authority.decrypt(server.bundle(), layout, "r")


def test_a_forged_aggregate_of_pads_around_one_victim_is_refused():
    """Attack 5 of issue 24: the server encrypts two pads itself (anyone holding the public context can) and
    presents them with one victim's update as a three-client round, under a fresh round id. Each pad needs an
    enrolled member's signature for this round: unsigned, signed by the server's own key, or a member's update
    replayed from another round — all refused, and nothing is decrypted."""
    from privfer.secagg import InvalidSignature, UnenrolledClient
    from privfer.secagg.identity import Identity
    from privfer.secagg.he import update_statement

    config = make_ckks_config(num_clients=5, min_clients=3)
    authority = make_authority(config)
    layout = HELayout(((3,),), config)
    public = authority.public_context()
    victim = he_client(1, public, layout, "fresh").encrypt([np.array([0.25, -1.5, 3.0])])
    server_key = Identity.generate()

    def pad(sender, sign):
        blobs = tuple(ts.ckks_vector(ts.context_from(public), c.tolist()).serialize()
                      for c in layout.pack([np.zeros(3)], 1, None)[0])
        return HEMessage(kind="update", round_id="fresh", sender=sender, ciphertexts=blobs,
                         signature=sign(update_statement(CERT.study, "fresh", sender, blobs))).to_bytes()

    unsigned = [pad(c, lambda _: bytes(64)) for c in (2, 3)]
    server_signed = [pad(c, server_key.sign) for c in (2, 3)]
    sybils = [pad(c, server_key.sign) for c in (77, 78)]
    replayed = [he_client(c, public, layout, "old").encrypt([np.zeros(3)]).to_bytes() for c in (2, 3)]
    for pads, error in ((unsigned, InvalidSignature), (server_signed, InvalidSignature), (sybils, UnenrolledClient),
                        (replayed, WrongRound)):
        senders = (1, *(HEMessage.from_bytes(p).sender for p in pads))
        bundle = HEMessage(kind="bundle", round_id="fresh", sender=0, included=tuple(sorted(senders)),
                           updates=(victim.to_bytes(), *pads))
        with pytest.raises(error):
            authority.decrypt(bundle, layout, "fresh")
    duplicated = HEMessage(kind="bundle", round_id="fresh", sender=0, included=(1, 1, 1),
                           updates=(victim.to_bytes(),) * 3)
    with pytest.raises((DuplicateSender, MalformedMessage)):
        authority.decrypt(duplicated, layout, "fresh")
    # the honest server refuses the pads on arrival too
    server = HEServer(public, layout, "fresh", config, CERT)
    with pytest.raises(InvalidSignature):
        server.receive(server_signed[0])


def test_a_chunk_that_does_not_fit_leaves_nothing_in_the_sum():
    config = make_ckks_config(num_clients=4, min_clients=2)
    authority = make_authority(config)
    layout = HELayout(((5000,),), config)  # two chunks: 4,096 + 906 values (+ extras)
    public = authority.public_context()
    server = HEServer(public, layout, "r", config)
    clients = {cid: he_client(cid, public, layout, "r") for cid in (1, 2, 3)}
    server.receive(clients[1].encrypt([np.ones(5000)]))
    context = ts.context_from(public)
    first = ts.ckks_vector(context, [1.0] * config.slots).serialize()
    short = ts.ckks_vector(context, [1.0] * 10).serialize()
    server.receive(signed_sealed(public, 2, "r", [first, short]))
    server.receive(clients[3].encrypt([np.ones(5000)]))
    plain = authority.decrypt(server.bundle(), layout, "r")
    assert plain.included == (1, 3) and authority.rejected == {2}
    np.testing.assert_allclose(plain.arrays[0], 2.0, atol=1e-5)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"coeff_mod_bit_sizes": (60, 60, 60, 60)}, "sum to 240 bits; poly_modulus_degree 8192 allows at most 218"),
        ({"scale_bits": 50}, "scale_bits 50 exceeds an intermediate modulus of 40 bits"),
        ({"num_clients": 1000}, "a sum of 1000 clients can reach"),
        ({"scale_bits": 20, "coeff_mod_bit_sizes": (60, 20, 60), "num_clients": 100, "max_examples": 100},
         "scale_bits 20 is too coarse for 100 clients"),
        ({"min_clients": 20, "num_clients": 10}, "min_clients 20 exceeds num_clients 10"),
    ],
)
def test_parameters_are_checked_at_config_time(settings, message):
    with pytest.raises(ConfigError, match=message):
        make_ckks_config(**{"num_clients": 10, **settings})


def test_sixteen_k_ring_is_selectable():
    config = make_ckks_config(num_clients=2, min_clients=2, poly_modulus_degree=16384,
                              coeff_mod_bit_sizes=(60, 40, 40, 40, 60))
    assert config.slots == 8192
    result = aggregate({1: [np.ones(9000)], 2: [np.ones(9000)]}, config)
    np.testing.assert_allclose(result.total[0], 2.0, atol=result.error_bound)


def test_clipped_counts_are_summed_exactly_under_encryption():
    from privfer.secagg import ClippingWarning

    config = make_ckks_config(num_clients=3, min_clients=2, clipping_range=1.0)
    updates = {1: [np.full(3000, 2.0)], 2: [np.zeros(3000)], 3: [np.concatenate([np.full(1100, -5.0), np.zeros(1900)])]}
    with pytest.warns(ClippingWarning, match="4100 of 9000 values"):
        result = aggregate(updates, config)
    assert (result.clipping.clipped, result.clipping.max_abs) == (4100, None)
    np.testing.assert_allclose(result.total[0][:1100], 1.0 - 1.0, atol=result.error_bound)


def test_a_chunk_at_another_scale_is_rolled_back():
    config = make_ckks_config(num_clients=3, min_clients=2)
    authority = make_authority(config)
    layout = HELayout(((5000,),), config)
    public = authority.public_context()
    server = HEServer(public, layout, "r", config)
    server.receive(he_client(1, public, layout, "r").encrypt([np.ones(5000)]))
    other_scale = ts.context_from(public)
    other_scale.global_scale = 2.0**30
    second = ts.ckks_vector(other_scale, [1.0] * (layout.length - config.slots)).serialize()
    first = ts.ckks_vector(ts.context_from(public), [1.0] * config.slots).serialize()
    server.receive(signed_sealed(public, 2, "r", [first, second]))
    server.receive(he_client(3, public, layout, "r").encrypt([np.ones(5000)]))
    plain = authority.decrypt(server.bundle(), layout, "r")
    assert plain.included == (1, 3) and authority.rejected == {2}
    np.testing.assert_array_equal(plain.arrays[0], 2.0)  # client 2's first chunk was taken out again


def test_the_release_carries_no_ckks_noise():
    """Two encryptions of the same grid-valued inputs under fresh randomness release bit-identical sums: what
    leaves the key authority is a function of the true sum alone (no decryption noise for key recovery)."""
    config = make_ckks_config(num_clients=3)
    scale = 2.0**config.grid
    rng = np.random.default_rng(5)
    updates = {c: [np.round(rng.uniform(-4, 4, 300) * scale) / scale] for c in (1, 2, 3)}
    first = aggregate(updates, config, round_id="a")
    second = aggregate(updates, config, round_id="b")
    exact = sum(updates[c][0] for c in updates)
    assert first.total[0].tobytes() == second.total[0].tobytes()
    np.testing.assert_array_equal(first.total[0], exact)
    # the raw decryptions do differ: the noise the release rounds away is really there
    authority = make_authority(config)
    layout = HELayout.for_arrays(updates[1], config)
    public = authority.public_context()
    raws = []
    for _ in range(2):
        sealed = he_client(1, public, layout, "x").encrypt(updates[1])
        vector = ts.ckks_vector_from(ts.context_from(public), authority._unseal(sealed, layout)[0])
        vector.link_context(authority._context)
        raws.append(np.asarray(vector.decrypt()))
    assert not np.array_equal(raws[0], raws[1])


def test_one_client_aggregates_are_refused_by_config():
    for kwargs in ({"num_clients": 1, "min_clients": 1}, {"num_clients": 4, "min_clients": 1}):
        with pytest.raises(ConfigError):
            make_ckks_config(**kwargs)


def test_a_grid_finer_than_the_decryption_error_is_refused():
    finest = make_ckks_config(num_clients=64).finest_grid_bits()
    with pytest.raises(ConfigError, match="finer than the decryption error"):
        make_ckks_config(num_clients=64, grid_bits=finest + 1)


def test_a_client_that_encrypts_out_of_range_values_or_counts_gets_nothing_released():
    """Attack 7 under CKKS: a client can encrypt anything with the public context (bypassing its own clipping);
    the key authority refuses a sum that in-range inputs cannot produce."""
    from privfer.secagg import OutOfRangeSum

    config = make_ckks_config(num_clients=3, min_clients=2, clipping_range=1.0, max_examples=100)
    layout = HELayout(((3,),), config)
    for index, value in ((0, 5000.25), (3, 1e6)):  # an update value; the example count
        authority = make_authority(config)
        public = authority.public_context()
        server = HEServer(public, layout, "r", config, CERT)
        for cid in (1, 2):
            server.receive(he_client(cid, public, layout, "r").encrypt([np.full(3, 0.25)], 10))
        vector = np.concatenate([np.full(3, 0.25), [10.0, 1.0, 0.0, 0.0, 0.0]])
        vector[index] = value
        server.receive(signed_sealed(public, 3, "r", [ts.ckks_vector(ts.context_from(public),
                                                                     vector.tolist()).serialize()]))
        with pytest.raises(OutOfRangeSum):
            authority.decrypt(server.bundle(), layout, "r")


def test_colluders_cannot_compute_on_an_honest_update():
    """Review finding (B1): a colluder that held an honest ciphertext could sign Enc(pad) - ct_honest and cancel
    it, so that "three signed updates" sum to one victim's. Updates are sealed to the key authority: what the
    server relays is not a CKKS vector, and re-signing it under another member's id does not open."""
    config = make_ckks_config(num_clients=4, min_clients=2)
    authority = make_authority(config)
    layout = HELayout(((3,),), config)
    public = authority.public_context()
    victim = he_client(1, public, layout, "r").encrypt([np.array([0.5, -1.0, 2.0])])
    with pytest.raises(Exception):  # the relayed bytes are no ciphertext anyone but the key authority can use
        ts.ckks_vector_from(ts.context_from(public), victim.ciphertexts[0])
    stolen = HEMessage(kind="update", round_id="r", sender=2, ciphertexts=victim.ciphertexts,
                       signature=ENROLLED[2].identity.sign(update_statement(CERT.study, "r", 2, victim.ciphertexts)))
    server = HEServer(public, layout, "r", config, CERT)
    for message in (victim, stolen, he_client(3, public, layout, "r").encrypt([np.zeros(3)])):
        server.receive(message)
    plain = authority.decrypt(server.bundle(), layout, "r")
    assert authority.rejected == {2} and plain.included == (1, 3)  # the copy did not open under client 2's id


def test_a_refused_decryption_consumes_the_round_and_tells_no_number():
    """Review finding (B2): refusals were repeatable per round id and printed the decryption error, an oracle on
    the CKKS noise. Now the first attempt that decrypts consumes the round id, whatever its outcome."""
    config = make_ckks_config(num_clients=3, min_clients=2, clipping_range=1.0)
    authority = make_authority(config)
    layout = HELayout(((3,),), config)
    public = authority.public_context()
    server = HEServer(public, layout, "r", config, CERT)
    server.receive(he_client(1, public, layout, "r").encrypt([np.zeros(3)]))
    lie = np.concatenate([np.zeros(3), [1.0, 5.0, 0.0, 0.0, 0.0]])  # a false client count
    server.receive(signed_sealed(public, 2, "r", [ts.ckks_vector(ts.context_from(public), lie.tolist()).serialize()]))
    from privfer.secagg import OutOfRangeSum

    with pytest.raises(OutOfRangeSum) as refused:
        authority.decrypt(server.bundle(), layout, "r")
    import re

    assert re.search(r"\d\.\d|\de-\d", str(refused.value)) is None  # no measured value: counts only
    with pytest.raises(RoundAborted, match="already decrypted"):
        authority.decrypt(server.bundle(), layout, "r")


def test_a_bundle_larger_than_the_round_is_refused():
    """Review finding (B3): the decryption error bound is sized for num_clients updates."""
    config = make_ckks_config(num_clients=2, min_clients=2)
    authority = make_authority(config)
    layout = HELayout(((3,),), config)
    public = authority.public_context()
    updates = tuple(he_client(c, public, layout, "r").encrypt([np.zeros(3)]).to_bytes() for c in (1, 2, 3))
    bundle = HEMessage(kind="bundle", round_id="r", sender=0, included=(1, 2, 3), updates=updates)
    with pytest.raises(RoundAborted, match="at most 2"):
        authority.decrypt(bundle, layout, "r")


def test_a_vector_carrying_many_ciphertexts_is_refused_before_loading():
    """Review finding (memory bomb): a CKKSVector may carry any number of compressed ciphertexts, tiny on the wire
    and megabytes once loaded; the key authority refuses any but one per chunk before TenSEAL parses it."""
    from privfer.secagg.he import check_vector_framing

    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    context.global_scale = 2.0**40
    honest = ts.ckks_vector(context, [1.0, 2.0]).serialize()
    check_vector_framing(honest, "client 1")
    # re-emit the ciphertext field (2, length-delimited) a second time: the framing of a two-ciphertext vector
    at, fields = 0, []
    while at < len(honest):
        tag = honest[at]
        at += 1
        if tag & 7 == 2:
            length, shift, start = 0, 0, at
            while True:
                byte = honest[at]
                at += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            fields.append((tag, honest[start:at + length]))
            at += length
        else:
            size = 8 if tag & 7 == 1 else 0
            fields.append((tag, honest[at:at + size]))
            at += size
    doubled = b"".join(bytes([t]) + body for t, body in fields) + b"".join(
        bytes([t]) + body for t, body in fields if t >> 3 == 2)
    with pytest.raises(InvalidCiphertext, match="carrying 2 ciphertexts"):
        check_vector_framing(doubled, "client 3")
    with pytest.raises(InvalidCiphertext):
        check_vector_framing(b"\x12\xff\xff\xff\xff\x0f", "client 3")  # a length beyond the bytes present
