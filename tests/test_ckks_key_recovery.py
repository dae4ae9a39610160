"""What the CKKS release protects against: Li and Micciancio's key recovery (EUROCRYPT 2021).

A CKKS ciphertext (c0, c1) of the aggregate satisfies c0 + c1 * s = Delta * m + e
(mod q, coefficient-wise in the NTT domain), where s is the secret key and e the
encryption noise. Whoever holds the ciphertext (the server does: it computed the
sum) and a *full* decryption of it (every complex slot at full precision) can
re-encode the decryption to get Delta * m + e exactly, and then solve for s in one
division per NTT coefficient. With s it decrypts every client's own ciphertext.

privfer's key authority releases only the sum rounded to the clients' grid: a
function of the true sum alone, with e rounded away. The same attack, given that
release, recovers nothing.

The attack reads SEAL objects through TenSEAL's bundled SEAL API (tenseal.sealapi).
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi

from privfer.secagg.identity import enroll_in_process
from privfer.secagg.he import add_updates, parse_chunks, HEMessage, COUNT_DIGITS, DIGIT, HEClient, HELayout, HEServer, KeyAuthority, make_ckks_config


def _seal(obj, factory, context, path):
    """A TenSEAL-side SEAL object as a sealapi object (same parameters, so it loads in the same context)."""
    obj.save(str(path))
    loaded = factory()
    loaded.load(context, str(path))
    return loaded


def _words(array) -> list[int]:
    return [array[i] for i in range(array.size())]


class KeyRecovery:
    """The attacker: holds one ciphertext of the aggregate, is handed a decryption of it, solves for s."""

    def __init__(self, vector: ts.CKKSVector, context: ts.Context, tmp_path) -> None:
        self.seal_context = context.seal_context().data
        self.ciphertext = _seal(vector.ciphertext()[0], lambda: sealapi.Ciphertext(self.seal_context),
                                self.seal_context, tmp_path / "ct")
        self.degree = self.ciphertext.poly_modulus_degree()
        self.levels = self.ciphertext.coeff_modulus_size()
        data = self.seal_context.get_context_data(self.ciphertext.parms_id())
        self.moduli = [m.value() for m in data.parms().coeff_modulus()]
        words = _words(self.ciphertext.dyn_array())
        size = self.levels * self.degree
        self.c0, self.c1 = words[:size], words[size : 2 * size]
        self.encoder = sealapi.CKKSEncoder(self.seal_context)

    def recover(self, slots: list[complex]) -> list[int]:
        plain = sealapi.Plaintext()
        self.encoder.encode(slots, self.ciphertext.parms_id(), self.ciphertext.scale, plain)
        message = [plain.data(i) for i in range(self.levels * self.degree)]
        key = []
        for k, (m, c0, c1) in enumerate(zip(message, self.c0, self.c1)):
            q = self.moduli[k // self.degree]
            key.append((m - c0) * pow(c1, -1, q) % q)
        return key


@pytest.fixture(scope="module")
def round_():
    """One CKKS round of three clients; the server's aggregate; the key authority's release."""
    config = make_ckks_config(num_clients=3)
    scale = 2.0**config.grid
    rng = np.random.default_rng(11)
    updates = {c: [np.round(rng.uniform(-2, 2, 500) * scale) / scale] for c in (1, 2, 3)}
    enrolled = enroll_in_process(list(updates))
    authority = KeyAuthority(config, enrolled[1].certificate)
    layout = HELayout.for_arrays(updates[1], config)
    public = authority.public_context()
    server = HEServer(public, layout, "r", config)
    messages = {c: HEClient(c, public, layout, "r", enrolled[c], authority.sealing_key).encrypt(updates[c])
                for c in updates}
    for message in messages.values():
        server.receive(message.to_bytes())
    release = authority.decrypt(server.bundle().to_bytes(), layout, "r")
    # the aggregate ciphertext the key authority decrypted (sealed updates: only it could form it; the attack
    # below is what anyone holding it and a noisy decryption could do)
    context = ts.context_from(public)
    summed = add_updates([parse_chunks(context, authority._unseal(m, layout), layout, "c")
                          for m in messages.values()], list(messages))
    aggregate = HEMessage(kind="update", round_id="r", sender=0, ciphertexts=tuple(v.serialize() for v in summed))
    return config, authority, updates, messages, aggregate, release


def _secret_key(authority, levels, degree, tmp_path) -> list[int]:
    context = authority._context.seal_context().data
    key = _seal(authority._context.secret_key().data, sealapi.SecretKey, context, tmp_path / "sk")
    return _words(key.data().dyn_array())[: levels * degree]


def test_a_full_decryption_of_the_aggregate_gives_away_the_secret_key(round_, tmp_path):
    _, authority, _, _, aggregate, _ = round_
    vector = ts.ckks_vector_from(authority._context, aggregate.ciphertexts[0])
    attacker = KeyRecovery(vector, authority._context, tmp_path)
    # a raw decryption of every complex slot: what a naive release (or a decryption oracle) would hand out
    decryptor = sealapi.Decryptor(attacker.seal_context, authority._context.secret_key().data)
    plain = sealapi.Plaintext()
    decryptor.decrypt(attacker.ciphertext, plain)
    slots = attacker.encoder.decode_complex(plain)
    secret = _secret_key(authority, attacker.levels, attacker.degree, tmp_path)
    # every coefficient of s (at the ciphertext's levels): with it, every client's own ciphertext opens
    assert attacker.recover(slots) == secret


def test_privfers_release_leaves_the_attack_nothing_to_work_with(round_, tmp_path):
    config, authority, updates, _, aggregate, release = round_
    layout = HELayout.for_arrays(updates[1], config)
    # everything the key authority releases, in the order it was encrypted in
    digits = [(release.clipped // DIGIT**i) % DIGIT for i in range(COUNT_DIGITS)]
    released = np.concatenate([
        *(a.ravel() for a in release.arrays),
        [release.example_count, len(release.included), *digits],
        [release.metrics[name] for name in config.metrics],
    ])
    # all of it is the exact sum of the clients' grid vectors: a function of the inputs alone, no CKKS noise
    exact = sum(layout.pack(updates[c], 1, None)[0][0] for c in updates)  # grid inputs: packing is deterministic
    np.testing.assert_array_equal(released, exact)
    vector = ts.ckks_vector_from(authority._context, aggregate.ciphertexts[0])
    attacker = KeyRecovery(vector, authority._context, tmp_path)
    secret = _secret_key(authority, attacker.levels, attacker.degree, tmp_path)
    decryptor = sealapi.Decryptor(attacker.seal_context, authority._context.secret_key().data)
    plain = sealapi.Plaintext()
    decryptor.decrypt(attacker.ciphertext, plain)
    raw = np.asarray(attacker.encoder.decode_complex(plain))

    def as_slots(real: np.ndarray, imaginary: np.ndarray) -> list[complex]:
        """One builder for both inputs: the values, repeated over every slot as TenSEAL lays a short vector out."""
        return [complex(r, i) for r, i in zip(np.resize(real, config.slots), np.resize(imaginary, config.slots))]

    # the layout is right: the raw decryption is the release repeated over the slots, plus the noise
    assert np.max(np.abs(raw.real - np.resize(released, config.slots))) <= config.error_bound(len(updates))
    # positive control, through the same builder: the noisy decryption gives every coefficient of s ...
    assert attacker.recover(as_slots(raw.real, raw.imag)) == secret
    # ... the release (the same values without the noise) none: (m - c0) / c1 = s - e / c1 is noise
    guess = attacker.recover(as_slots(released, np.zeros(released.size)))
    assert sum(g == k for g, k in zip(guess, secret)) == 0
