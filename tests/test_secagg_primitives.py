"""Secure-aggregation building blocks: PRG, quantization, Shamir, keys, graph, messages."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from privfer.errors import ConfigError
from privfer.secagg import messages as m
from privfer.secagg import prg, shamir
from privfer.secagg.config import SecAggConfig, make_config
from privfer.secagg.errors import (
    DuplicateSender,
    MalformedMessage,
    MessageError,
    NotEnoughShares,
    ShareAuthenticationError,
    UnsupportedVersion,
)
from privfer.secagg.graph import neighbourhoods
from privfer.secagg.keys import (
    PURPOSE_MASK,
    PURPOSE_SHARE,
    KeyPairs,
    agree,
    decrypt_share,
    encrypt_share,
)
from privfer.secagg.quantize import ClippingWarning, decode_fixed_point, encode_fixed_point
from privfer.secagg.randomness import InsecureDeterministicRandomness


def test_secagg_imports_no_torch():
    code = "import sys, privfer.secagg; assert 'torch' not in sys.modules, 'secagg imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- PRG ---------------------------------------------------------------------

def test_prg_is_the_aes_ctr_keystream_of_the_full_seed():
    seed = bytes(range(32))
    words = prg.expand(seed, 10, 32)
    stream = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor().update(b"\0" * 40)
    assert words.tobytes() == stream
    assert prg.expand(seed, 5, 64).tobytes() == stream[:40]
    for bit in (0, 100, 255):  # every bit of the seed changes the stream
        flipped = bytearray(seed)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert not np.array_equal(prg.expand(bytes(flipped), 10, 32), words)


def test_prg_rejects_short_seeds():
    with pytest.raises(ValueError, match="32 bytes"):
        prg.expand(b"\x01" * 4, 10)


# -- quantization --------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.floats(-8, 8), min_size=1, max_size=50), bits=st.sampled_from([32, 64]))
def test_fixed_point_round_trip_within_one_step(values, bits):
    precision = 20 if bits == 32 else 40
    words, report = encode_fixed_point(np.array(values), 8.0, precision, bits)
    assert report.clipped == 0
    decoded = decode_fixed_point(words, precision, bits)
    assert np.all(np.abs(decoded - np.array(values)) < 2.0**-precision)


def test_values_on_the_grid_encode_exactly_even_when_large():
    precision = 40
    x = np.array([1.0, -2.5, 3.0 + 2.0**-precision, 7.999])
    x = np.round(x * 2.0**precision) / 2.0**precision
    for _ in range(20):
        words, _ = encode_fixed_point(x, 8.0, precision, 64)
        assert np.array_equal(decode_fixed_point(words, precision, 64), x)


def test_stochastic_rounding_is_unbiased():
    x = np.full(200_000, 0.3)
    words, _ = encode_fixed_point(x, 1.0, 2, 32)  # steps of 0.25: 0.3 rounds to 0.25 or 0.5
    decoded = decode_fixed_point(words, 2, 32)
    assert set(np.unique(decoded)) == {0.25, 0.5}
    assert abs(decoded.mean() - 0.3) < 0.002


def test_clipping_is_counted_and_warned_never_silent():
    with pytest.warns(ClippingWarning, match="2 of 4 values exceed the clipping range"):
        words, report = encode_fixed_point(np.array([0.5, 9.0, -12.0, 1.0]), 8.0, 10, 32)
    assert (report.clipped, report.total, report.max_abs) == (2, 4, 12.0)
    np.testing.assert_allclose(decode_fixed_point(words, 10, 32)[1:3], [8.0, -8.0], atol=1e-3)


def test_non_finite_updates_are_refused():
    with pytest.raises(ValueError, match="finite"):
        encode_fixed_point(np.array([1.0, np.nan]), 8.0, 10, 32)


def test_overflowing_configs_are_rejected_with_the_arithmetic():
    with pytest.raises(ConfigError, match=r"modulus 2\^32 overflows: 1000 clients x \(clipping_range 8 x 2\^20 \+ 1\)"):
        make_config(num_clients=1000, precision_bits=20)
    with pytest.raises(ConfigError, match="example counts"):
        make_config(num_clients=1000, max_examples=10**7)
    with pytest.raises(ConfigError, match="fractional bits fit"):
        make_config(num_clients=60000, clipping_range=1e4)
    assert make_config(num_clients=60000, clipping_range=1e4, modulus_bits=64).update_precision_bits > 20


def test_threshold_must_exceed_half_the_group():
    with pytest.raises(ConfigError, match="more than half"):
        make_config(num_clients=10, threshold=5)
    assert SecAggConfig(num_clients=10).group_threshold == 6  # strict majority
    assert SecAggConfig(num_clients=10, threshold_fraction=2 / 3).group_threshold == 7
    assert SecAggConfig(num_clients=3).group_threshold == 2
    plus = SecAggConfig(num_clients=100, graph="harary")
    assert plus.degree == 34 and plus.group_threshold == 19  # k/2 + 2
    assert SecAggConfig(num_clients=100, graph="harary", expected_dropout=0.0, colluding_fraction=0.0).degree == 14
    assert SecAggConfig(num_clients=100, graph="harary", expected_dropout=0.3).degree == 99  # complete
    with pytest.raises(ConfigError, match="at least k/2 \\+ 2 = 12: otherwise dropouts can cut the ring"):
        make_config(num_clients=100, graph="harary", neighbours=20, threshold=11)


def test_harary_degree_keeps_group_failure_negligible():
    from privfer.secagg.config import FAILURE_PROBABILITY, _binomial_tail, group_threshold

    def risk(n, k, dropout, colluding):
        t = group_threshold(k + 1, 0.5, sparse=True)
        return max(n * _binomial_tail(k, dropout, k + 1 - t), n * _binomial_tail(k, colluding, t - 1))

    for n in (50, 200, 1000):
        for dropout in (0.05, 0.1, 0.2):
            config = SecAggConfig(num_clients=n, graph="harary", expected_dropout=dropout)
            k = config.degree
            if k < n - 1:
                assert risk(n, k, dropout, 0.1) <= FAILURE_PROBABILITY
                assert risk(n, k - 2, dropout, 0.1) > FAILURE_PROBABILITY or k - 2 < 2 * np.ceil(np.log2(n))


# -- Shamir ---------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 30))
def test_any_t_shares_reconstruct(data, n):
    t = data.draw(st.integers(1, n))
    holders = data.draw(st.lists(st.integers(1, shamir.PRIME - 1), min_size=n, max_size=n, unique=True))
    secrets = [os.urandom(32) for _ in range(data.draw(st.integers(1, 3)))]
    shares = shamir.split(secrets, holders, t)
    subset = data.draw(st.permutations(range(n)))[:t]
    assert shamir.reconstruct([holders[i] for i in subset], shares[subset], t) == secrets
    if t > 1:
        with pytest.raises(NotEnoughShares, match=f"{t - 1} shares given, the threshold is {t}"):
            shamir.reconstruct([holders[i] for i in subset[:-1]], shares[subset[:-1]], t)


def test_fewer_than_t_shares_are_uniform():
    # With t = 2 one share of any secret is a uniform field element: the share of
    # holder 1 for a fixed secret, over fresh coefficients, covers the field evenly.
    secret = b"\x07" * 32
    values = np.stack([shamir.split([secret], [1, 2], 2)[0, 0, 0] for _ in range(4000)])
    buckets = np.bincount((values * 8 // shamir.PRIME).astype(int), minlength=8)
    assert buckets.min() > 400


def test_share_bytes_round_trip_and_validation():
    share = shamir.split([os.urandom(32)], [5, 6], 2)[0, 0]
    assert np.array_equal(shamir.share_from_bytes(shamir.share_to_bytes(share)), share)
    with pytest.raises(ValueError):
        shamir.share_from_bytes(b"\xff" * shamir.SHARE_BYTES)


# -- keys -------------------------------------------------------------------------

def test_key_agreement_is_symmetric_and_bound_to_round_purpose_and_pair():
    a, b, c = KeyPairs.generate(), KeyPairs.generate(), KeyPairs.generate()
    k_ab = agree(a.s_private, b.s_public, PURPOSE_MASK, "r1", 1, 2)
    assert k_ab == agree(b.s_private, a.s_public, PURPOSE_MASK, "r1", 2, 1)
    assert k_ab != agree(a.s_private, b.s_public, PURPOSE_MASK, "r2", 1, 2)
    assert k_ab != agree(a.s_private, b.s_public, PURPOSE_SHARE, "r1", 1, 2)
    assert k_ab != agree(a.s_private, b.s_public, PURPOSE_MASK, "r1", 1, 3)
    assert k_ab != agree(a.s_private, c.s_public, PURPOSE_MASK, "r1", 1, 2)


def test_share_encryption_authenticates_content_round_and_parties():
    key = os.urandom(32)
    roster = b"R" * 32
    blob = encrypt_share(key, b"secret share", "r1", 1, 2, roster)
    assert decrypt_share(key, blob, "r1", 1, 2, roster) == b"secret share"
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    for args in [(bytes(tampered), "r1", 1, 2, roster), (blob, "r2", 1, 2, roster), (blob, "r1", 2, 1, roster),
                 (blob, "r1", 1, 3, roster), (blob, "r1", 1, 2, b"S" * 32)]:  # last: a holder shown another roster
        with pytest.raises(ShareAuthenticationError):
            decrypt_share(key, *args)


# -- graph ---------------------------------------------------------------------------

def test_harary_graph_is_regular_symmetric_and_public():
    ids = list(range(1, 51))
    graph = neighbourhoods(ids, 8, b"s" * 32)
    assert all(len(graph[u]) == 8 and u not in graph[u] for u in ids)
    assert all(u in graph[v] for u in ids for v in graph[u])
    assert graph == neighbourhoods(list(reversed(ids)), 8, b"s" * 32)
    assert graph != neighbourhoods(ids, 8, b"t" * 32)
    complete = neighbourhoods(ids[:5], 4)
    assert complete[1] == {2, 3, 4, 5}


# -- messages ---------------------------------------------------------------------------

SAMPLES = [
    m.AdvertiseKeys(round_id="r", sender=3, c_public=b"\x01" * 32, s_public=b"\x02" * 32),
    m.KeyRoster(round_id="r", sender=0, keys={1: (b"\x01" * 32, b"\x02" * 32), 9: (b"\x03" * 32, b"\x04" * 32)}),
    m.ShareKeys(round_id="r", sender=3, ciphertexts={1: b"abc", 2: b"defg"},
                commitments={1: bytes(range(64)), 2: bytes(64), 3: b"\xff" * 64}, seed_commitment=bytes(range(32))),
    m.ForwardedShares(round_id="r", sender=0, receiver=3, ciphertexts={1: b"abc"}, commitments={1: bytes(64)}),
    m.MaskedInput(round_id="r", sender=3, modulus_bits=32, vector=np.arange(5, dtype=np.uint32)),
    m.MaskedInput(round_id="r", sender=3, modulus_bits=64, vector=np.arange(5, dtype=np.uint64)),
    m.UnmaskRequest(round_id="r", sender=0, survivors=(1, 2, 3), dropped=(4,)),
    m.UnmaskResponse(round_id="r", sender=3, seed_shares={1: b"\x00" * 36}, key_shares={4: b"\x01" * 36}),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda x: type(x).__name__)
def test_messages_round_trip(message):
    again = m.decode(message.to_bytes())
    assert type(again) is type(message)
    if isinstance(message, m.MaskedInput):
        assert np.array_equal(again.vector, message.vector) and again.vector.dtype == message.vector.dtype
    else:
        assert again == message


def test_masked_vectors_are_raw_words_not_json():
    message = SAMPLES[4]
    assert len(message.to_bytes()) == len(message._header()) + 5 + 5 * 4 + 4  # + an empty complaint list


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda b: b[:-1], MalformedMessage),
        (lambda b: b + b"\0", MalformedMessage),
        (lambda b: b"XXXX" + b[4:], MalformedMessage),
        (lambda b: b[:4] + bytes([9]) + b[5:], UnsupportedVersion),
        (lambda b: b[:5] + bytes([77]) + b[6:], MalformedMessage),
    ],
)
def test_malformed_bytes_raise_specific_errors(mutate, error):
    with pytest.raises(error):
        m.decode(mutate(SAMPLES[2].to_bytes()))


def test_duplicate_entries_are_rejected():
    raw = m.UnmaskRequest(round_id="r", sender=0, survivors=(1, 2), dropped=()).to_bytes()
    doubled = raw.replace(b"\x00\x00\x00\x02\x00\x00\x00\x01\x00\x00\x00\x02", b"\x00\x00\x00\x02\x00\x00\x00\x01\x00\x00\x00\x01")
    with pytest.raises(DuplicateSender):
        m.decode(doubled)


def test_ids_must_be_valid_and_increasing():
    good = m.UnmaskRequest(round_id="r", sender=0, survivors=(1, 2), dropped=()).to_bytes()
    decreasing = good.replace(b"\x00\x00\x00\x01\x00\x00\x00\x02", b"\x00\x00\x00\x02\x00\x00\x00\x01")
    with pytest.raises(MalformedMessage, match="increasing order"):
        m.decode(decreasing)
    out_of_range = good.replace(b"\x00\x00\x00\x01\x00\x00\x00\x02", b"\x00\x00\x00\x00\x00\x00\x00\x02")
    with pytest.raises(MalformedMessage, match="outside"):
        m.decode(out_of_range)
    with pytest.raises(ValueError, match="255 bytes"):
        m.UnmaskRequest(round_id="é" * 200, sender=0, survivors=(), dropped=())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(SAMPLES))
def test_random_bytes_only_ever_raise_message_errors(noise, sample):
    raw = sample.to_bytes()
    for candidate in (noise, raw[: len(noise) % (len(raw) + 1)], raw[:6] + noise):
        try:
            m.decode(candidate)
        except MessageError:
            pass


def test_deterministic_randomness_is_reproducible_and_flagged():
    a = InsecureDeterministicRandomness(b"k" * 32)
    b = InsecureDeterministicRandomness(b"k" * 32)
    assert a.bytes(10) + a.bytes(5) == b.bytes(15) and a.deterministic
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KeyPairs.generate(a)
