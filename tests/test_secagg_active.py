"""A server that deviates from the protocol (SPEC sections 1, 5, 6.4): each attack is performed for real.

Under ``security="semi_honest"`` each attack below succeeds (the test shows the victim's input recovered
exactly), so the test attacks something real; under ``security="active"`` the same attack is refused by the
honest clients before any share that would complete it leaves them.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privfer.secagg import PayloadLayout, SecAggClient, SecAggConfig, SecAggServer, aggregate, shamir
from privfer.secagg import messages as m
from privfer.secagg.errors import (
    ConsistencyCheckFailed,
    DuplicateSender,
    InvalidCertificate,
    InvalidInput,
    InvalidSignature,
    RoundAborted,
    UnenrolledClient,
    UnknownSender,
    WrongRound,
)
from privfer.secagg.identity import Enrollment, EnrollmentAuthority, Identity, enroll_in_process
from privfer.secagg.keys import PURPOSE_MASK, KeyPairs, agree
from privfer.secagg.prg import MaskExpander
from privfer.secagg.statements import context_digest

ROUND = "active-attack"


class Round:
    """n clients (ids 1..n) run honestly up to their masked inputs; the test then plays the server."""

    def __init__(self, n: int, security: str, *, min_inputs: int | None = None, contexts=None, seed: int = 0,
                 colluding_fraction: float = 0.1, enrollments=None, updates=None, sum_bound: int = 1 << 20,
                 modulus_bits: int = 32):
        self.config = SecAggConfig(num_clients=n, security=security, encoding="integer", integer_sum_bound=sum_bound,
                                   min_inputs=min_inputs, colluding_fraction=colluding_fraction,
                                   modulus_bits=modulus_bits)
        rng = np.random.default_rng(seed)
        self.updates = updates or {c: [rng.integers(-1000, 1000, 5)] for c in range(1, n + 1)}
        self.layout = PayloadLayout.for_arrays(self.updates[1], self.config)
        self.enrollments = enrollments or (enroll_in_process(range(1, n + 1)) if security == "active" else {})
        certificate = self.enrollments[1].certificate if self.enrollments else None
        contexts = contexts or {}
        self.clients = {c: SecAggClient(c, self.config, ROUND, self.layout, enrollment=self.enrollments.get(c),
                                        context=contexts.get(c, context_digest(b"model")))
                        for c in self.updates}
        self.server = SecAggServer(self.config, ROUND, self.layout, certificate=certificate)
        for c, client in self.clients.items():
            self.server.receive_advertise(client.advertise_keys().to_bytes(), peer=c)
        roster = m.KeyRoster.from_bytes(self.server.key_roster().to_bytes())
        self.keys = dict(roster.keys)
        for c, client in self.clients.items():
            self.server.receive_share_keys(client.share_keys(roster).to_bytes(), peer=c)
        for c, bundle in self.server.forward_shares().items():
            masked = self.clients[c].masked_input(m.ForwardedShares.from_bytes(bundle.to_bytes()), self.updates[c])
            self.server.receive_masked_input(masked.to_bytes(), peer=c)

    def request(self, survivors) -> m.UnmaskRequest:
        survivors = tuple(sorted(survivors))
        dropped = tuple(sorted(set(self.clients) - set(survivors)))
        return m.UnmaskRequest(round_id=ROUND, sender=0, survivors=survivors, dropped=dropped)

    def copy(self, client: int) -> SecAggClient:
        """A colluding client answers as often as the server likes: a fresh copy of its state each time."""
        return SecAggClient.restore(self.clients[client].export_state(), enrollment=self.enrollments.get(client))

    def recover(self, victim: int, seed: bytes, s_private: bytes) -> np.ndarray:
        """The victim's input from its masked vector, its self-mask seed and its mask key."""
        bits = self.config.modulus_bits
        expander = MaskExpander(self.layout.length, bits)
        x = self.server._masked[victim] - expander.expand(seed)
        for peer in self.clients:
            if peer == victim:
                continue
            mask = expander.expand(agree(s_private, self.keys[peer][1], PURPOSE_MASK, ROUND, victim, peer))
            if victim < peer:
                x -= mask
            else:
                x += mask
        return self.layout.decode(x).arrays[0]


def rebuild(shares: dict[int, bytes], threshold: int) -> bytes:
    holders = sorted(shares)[:threshold]
    stacked = np.stack([shamir.share_from_bytes(shares[h]) for h in holders])[:, None, :]
    return shamir.reconstruct(holders, stacked, threshold)[0]


def split_view_attack(security: str, game: Round | None = None):
    """Attack 1 of issue 24: n = 11, t = 6, min_inputs = 10, one colluder (client 10). Clients 1-4 and the victim
    (11) are told "the victim survived", clients 5-9 "the victim dropped"; the colluder answers both."""
    game = game or Round(11, security, min_inputs=10)
    victim, colluder, t = 11, 10, game.config.group_threshold
    assert t == 6
    survived, dropped = game.request(range(1, 12)), game.request(range(1, 11))
    views = {c: survived for c in (1, 2, 3, 4, victim)} | {c: dropped for c in (5, 6, 7, 8, 9)}
    seed_shares, key_shares, refusals = {}, {}, {}
    if security == "active":
        signatures = {}
        for c, view in views.items():
            signatures[(c, id(view))] = game.clients[c].check_consistency(view).signature
        for view in (survived, dropped):  # the colluder signs both statements
            signatures[(colluder, id(view))] = game.copy(colluder).check_consistency(view).signature
        for c, view in views.items():
            # the best the server can do: every signature made on this client's view, plus the others
            mine = {s: sig for (s, v), sig in signatures.items() if v == id(view)}
            others = {s: sig for (s, v), sig in signatures.items() if v != id(view) and s not in mine}
            try:
                response = game.clients[c].unmask(m.SignatureList(round_id=ROUND, sender=0,
                                                                  signatures={**others, **mine}))
            except ConsistencyCheckFailed as exc:
                refusals[c] = exc
                continue
            seed_shares.update({c: response.seed_shares[victim]} if victim in response.seed_shares else {})
            key_shares.update({c: response.key_shares[victim]} if victim in response.key_shares else {})
    else:
        for c, view in views.items():
            response = game.clients[c].unmask(view)
            if victim in response.seed_shares:
                seed_shares[c] = response.seed_shares[victim]
            if victim in response.key_shares:
                key_shares[c] = response.key_shares[victim]
    # the colluder's own shares of both secrets are the server's anyway
    held = game.clients[colluder]._held[victim]
    seed_shares[colluder] = shamir.share_to_bytes(held[0])
    key_shares[colluder] = shamir.share_to_bytes(held[1])
    return game, victim, t, seed_shares, key_shares, refusals


def test_split_views_with_one_colluder_recover_the_victim_under_semi_honest_security():
    game, victim, t, seed_shares, key_shares, _ = split_view_attack("semi_honest")
    assert len(seed_shares) >= t and len(key_shares) >= t
    recovered = game.recover(victim, rebuild(seed_shares, t), rebuild(key_shares, t))
    np.testing.assert_array_equal(recovered, game.updates[victim][0])  # the attack is real


def test_split_views_are_refused_under_active_security():
    game, victim, t, seed_shares, key_shares, refusals = split_view_attack("active")
    honest = {1, 2, 3, 4, 5, 6, 7, 8, 9, victim}
    assert set(refusals) == honest  # no honest client reveals anything
    assert all(isinstance(exc, ConsistencyCheckFailed) for exc in refusals.values())
    assert len(seed_shares) == 1 and len(key_shares) == 1  # the colluder's own: far below t
    # the refusal names the signers whose signatures are on the other statement
    assert set(refusals[5].disagreeing) == {1, 2, 3, 4}  # the victim is no survivor in this view: not counted
    assert set(refusals[1].disagreeing) == {5, 6, 7, 8, 9}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(4, 9), colluders=st.integers(0, 2), cut=st.integers(0, 100), victim_side=st.booleans())
def test_no_split_of_the_survivors_passes_the_consistency_check(n, colluders, cut, victim_side):
    """Whatever partition of the honest clients into two views (which differ on whether the victim survived), and
    whatever the colluders sign, at most one view collects the threshold of signatures — with as many colluders
    as the config assumes (the guarantee's stated bound)."""
    colluders = min(colluders, (n - 2) // 2)  # colluding_fraction < 1/2
    game = Round(n, "active", colluding_fraction=(colluders + 0.5) / n if colluders else 0.0)
    assert game.config.colluders == colluders
    bad = set(range(n - colluders + 1, n + 1))
    victim = 1
    everyone, without = game.request(range(1, n + 1)), game.request(range(2, n + 1))
    honest = [c for c in game.clients if c not in bad]
    split = 1 + cut % len(honest)
    views = {c: (everyone if (i < split) == victim_side or c == victim else without) for i, c in enumerate(honest)}
    signed = {}
    for c, view in views.items():
        signed.setdefault(id(view), {})[c] = game.clients[c].check_consistency(view).signature
    for c in bad:
        for view in (everyone, without):
            signed.setdefault(id(view), {})[c] = game.copy(c).check_consistency(view).signature
    passed = set()
    for c, view in views.items():
        try:
            game.clients[c].unmask(m.SignatureList(round_id=ROUND, sender=0, signatures=signed.get(id(view), {})))
            passed.add(id(view))
        except ConsistencyCheckFailed:
            pass
    assert len(passed) <= 1  # never both: the victim's two secrets cannot both be released


def sybil_attack(security: str, forge):
    """Attack 2 of issue 24, zero colluders: the victim (client 1) is shown a roster of server-made keys for every
    other id; the server plays all of them, so the "sum" minus its own inputs is the victim's input."""
    n = 6
    config = SecAggConfig(num_clients=n, security=security, encoding="integer", integer_sum_bound=1 << 20)
    layout = PayloadLayout.for_arrays([np.zeros(4)], config)
    enrollments = enroll_in_process(range(1, n + 1)) if security == "active" else {}
    victim_input = [np.array([7, -3, 11, 5])]
    victim = SecAggClient(1, config, ROUND, layout, enrollment=enrollments.get(1))
    advert = victim.advertise_keys()
    # the server's own clients, with the ids of the real members 2..n
    fakes = {c: SecAggClient(c, config.model_copy(update={"security": "semi_honest"}), ROUND, layout)
             for c in range(2, n + 1)}
    keys = {1: (advert.c_public, advert.s_public)} | {
        c: (a.c_public, a.s_public) for c, a in ((c, f.advertise_keys()) for c, f in fakes.items())}
    signatures = forge(advert, keys) if security == "active" else {}
    roster = m.KeyRoster(round_id=ROUND, sender=0, keys=keys, signatures=signatures)
    shared = {1: victim.share_keys(roster)}  # under active security this is where the victim refuses
    for c, fake in fakes.items():
        shared[c] = fake.share_keys(m.KeyRoster(round_id=ROUND, sender=0, keys=keys))
    server = SecAggServer(config.model_copy(update={"security": "semi_honest"}), ROUND, layout)
    for c in sorted(keys):
        server.receive_advertise(m.AdvertiseKeys(round_id=ROUND, sender=c, c_public=keys[c][0],
                                                 s_public=keys[c][1]), peer=c)
    server.key_roster()
    for c, message in shared.items():
        server.receive_share_keys(message.model_copy(update={"version": message.version}), peer=c)
    bundles = server.forward_shares()
    server.receive_masked_input(victim.masked_input(bundles[1], victim_input), peer=1)
    for c, fake in fakes.items():
        server.receive_masked_input(fake.masked_input(bundles[c], [np.zeros(4, dtype=np.int64)]), peer=c)
    request = server.unmask_request()
    for c, client in {1: victim, **fakes}.items():
        server.receive_unmask(client.unmask(request), peer=c)
    return server.finish().decoded.arrays[0], victim_input[0]


def test_a_roster_of_server_made_keys_reads_the_victim_under_semi_honest_security():
    total, victim_input = sybil_attack("semi_honest", None)
    np.testing.assert_array_equal(total, victim_input)  # the server's inputs are zeros: the sum IS the victim's


def _unsigned(advert, keys):
    return {c: advert.signature if c == 1 else bytes(64) for c in keys}


def _server_signed(advert, keys):
    """The server signs the made-up entries with an Ed25519 key of its own."""
    from privfer.secagg.statements import advertise_statement

    mine = Identity.generate()
    return {c: advert.signature if c == 1 else mine.sign(advertise_statement("privfer-simulation", ROUND, c, *keys[c]))
            for c in keys}


@pytest.mark.parametrize("forge", [_unsigned, _server_signed], ids=["zero-signatures", "server-signed"])
def test_a_roster_of_server_made_keys_is_refused_under_active_security(forge):
    with pytest.raises(InvalidSignature, match="client 2's key advertisement"):
        sybil_attack("active", forge)


def test_a_sybil_the_certificate_does_not_list_is_refused():
    game_enrollments = enroll_in_process([1, 2, 3])
    config = SecAggConfig(num_clients=4, security="active")
    layout = PayloadLayout.for_arrays([np.zeros(2)], config)
    clients = {c: SecAggClient(c, config, ROUND, layout, enrollment=game_enrollments[c]) for c in (1, 2, 3)}
    adverts = {c: client.advertise_keys() for c, client in clients.items()}
    sybil = KeyPairs.generate()
    keys = {c: (a.c_public, a.s_public) for c, a in adverts.items()} | {4: (sybil.c_public, sybil.s_public)}
    signatures = {c: a.signature for c, a in adverts.items()} | {4: Identity.generate().sign(b"anything")}
    with pytest.raises(UnenrolledClient, match="client 4 is not enrolled"):
        clients[1].share_keys(m.KeyRoster(round_id=ROUND, sender=0, keys=keys, signatures=signatures))
    # the honest server refuses the sybil's advertisement too
    server = SecAggServer(config, ROUND, layout, certificate=game_enrollments[1].certificate)
    with pytest.raises(UnenrolledClient):
        server.receive_advertise(m.AdvertiseKeys(round_id=ROUND, sender=4, c_public=sybil.c_public,
                                                 s_public=sybil.s_public, signature=bytes(64)), peer=4)


def test_an_advertisement_replayed_from_another_round_or_with_a_swapped_key_is_refused():
    enrollments = enroll_in_process([1, 2, 3])
    config = SecAggConfig(num_clients=3, security="active")
    layout = PayloadLayout.for_arrays([np.zeros(2)], config)
    old = {c: SecAggClient(c, config, "old-round", layout, enrollment=enrollments[c]).advertise_keys()
           for c in (1, 2, 3)}
    new = {c: SecAggClient(c, config, ROUND, layout, enrollment=enrollments[c]) for c in (1, 2, 3)}
    fresh = {c: client.advertise_keys() for c, client in new.items()}
    keys = {c: (a.c_public, a.s_public) for c, a in fresh.items()}
    replayed = {1: fresh[1].signature, 2: old[2].signature, 3: fresh[3].signature}
    with pytest.raises(InvalidSignature, match="client 2"):
        new[1].share_keys(m.KeyRoster(round_id=ROUND, sender=0, keys=keys, signatures=replayed))
    # client 3's signed keys, but its mask key swapped for the server's
    server_keys = KeyPairs.generate()
    swapped = dict(keys) | {3: (keys[3][0], server_keys.s_public)}
    signatures = {c: a.signature for c, a in fresh.items()}
    with pytest.raises(InvalidSignature, match="client 3"):
        new[2].share_keys(m.KeyRoster(round_id=ROUND, sender=0, keys=swapped, signatures=signatures))


def test_one_members_keys_listed_under_two_ids_are_refused():
    game = enroll_in_process([1, 2, 3])
    config = SecAggConfig(num_clients=3, security="semi_honest")
    layout = PayloadLayout.for_arrays([np.zeros(2)], config)
    clients = {c: SecAggClient(c, config, ROUND, layout) for c in (1, 2, 3)}
    adverts = {c: client.advertise_keys() for c, client in clients.items()}
    keys = {c: (a.c_public, a.s_public) for c, a in adverts.items()} | {3: (adverts[2].c_public,
                                                                            adverts[2].s_public)}
    with pytest.raises(DuplicateSender):
        clients[1].share_keys(m.KeyRoster(round_id=ROUND, sender=0, keys=keys))
    del game


def test_clients_given_different_models_cannot_both_be_in_a_released_sum():
    """Attack 3's protocol half: the server trains some clients from another model. Their statements differ, so
    at most one group reaches the threshold; here neither does, and both name the other's signers."""
    contexts = {c: context_digest(b"model-A" if c <= 3 else b"model-B") for c in range(1, 7)}
    game = Round(6, "active", contexts=contexts)
    request = game.request(range(1, 7))
    signatures = {c: client.check_consistency(request).signature for c, client in game.clients.items()}
    everyone = m.SignatureList(round_id=ROUND, sender=0, signatures=signatures)
    for c, client in game.clients.items():
        with pytest.raises(ConsistencyCheckFailed) as caught:
            client.unmask(everyone)
        assert set(caught.value.disagreeing) == ({4, 5, 6} if c <= 3 else {1, 2, 3})


def test_an_honest_active_round_sums_exactly_with_dropouts():
    rng = np.random.default_rng(3)
    updates = {c: [rng.normal(size=(3, 2))] for c in range(1, 10)}
    result = aggregate(updates, SecAggConfig(num_clients=9, security="active"),
                       {2: "share_keys", 5: "masked_input", 8: "unmask"})
    assert result.included == [1, 3, 4, 6, 7, 8, 9]
    exact = sum(updates[c][0] for c in result.included)
    assert np.max(np.abs(result.total[0] - exact)) <= result.error_bound


def test_an_active_round_whose_survivor_does_not_sign_aborts_before_any_share():
    """Every survivor must sign (its input is in the sum either way): one that stops before signing ends the
    round; too few survivors end it before anyone signs."""
    updates = {c: [np.ones(2)] for c in range(1, 8)}
    with pytest.raises(RoundAborted, match=r"survivors \[3\] did not sign"):
        aggregate(updates, SecAggConfig(num_clients=7, security="active"), {3: "consistency"})
    # T = floor((7 + 1 colluder) / 2) + 1 = 5 survivors at least; three drop before their masked input
    with pytest.raises(RoundAborted, match="needs at least 5"):
        aggregate(updates, SecAggConfig(num_clients=7, security="active"),
                  {c: "masked_input" for c in (1, 2, 3)})


def test_min_inputs_counts_signatures_not_the_servers_list():
    """The server lists ten survivors (min_inputs 10) but only eight of them really took part and signed."""
    game = Round(10, "active", min_inputs=10)
    request = game.request(range(1, 11))
    signatures = {c: game.clients[c].check_consistency(request).signature for c in range(1, 9)}
    with pytest.raises(ConsistencyCheckFailed, match=r"no signature from \[9, 10\]"):
        game.clients[1].unmask(m.SignatureList(round_id=ROUND, sender=0, signatures=signatures))


def test_active_security_needs_an_enrollment_that_matches_the_client():
    config = SecAggConfig(num_clients=3, security="active")
    layout = PayloadLayout.for_arrays([np.zeros(2)], config)
    enrollments = enroll_in_process([1, 2])
    with pytest.raises(InvalidInput, match="enrollment"):
        SecAggClient(1, config, ROUND, layout)
    with pytest.raises(InvalidInput, match="enrolled as member 2"):
        SecAggClient(1, config, ROUND, layout, enrollment=enrollments[2])
    with pytest.raises(UnenrolledClient):
        Enrollment(1, Identity.generate(), enrollments[1].certificate)
    with pytest.raises(ValueError, match="certificate"):
        SecAggServer(config, ROUND, layout)


def test_the_consistency_threshold_rule():
    for n in range(2, 60):
        for fraction in (0.0, 0.1, 0.2, 0.33, 0.49):
            config = SecAggConfig(num_clients=n, colluding_fraction=fraction, security="active")
            c, t = config.colluders, config.consistency_threshold(n)
            assert 2 * t > n + c and t > c  # two statements would need an honest signer twice
            assert t <= n
    with pytest.raises(ValueError, match="group"):
        SecAggConfig(num_clients=20, security="active", roster="group", graph="harary")
    # review finding: a fraction that rounds to no colluder still assumes one (10% of 9 clients)
    assert SecAggConfig(num_clients=9, security="active").colluders == 1
    assert SecAggConfig(num_clients=9, security="active", colluding_fraction=0.0).colluders == 0
    with pytest.raises(ValueError, match="exceed the 2 colluders"):
        SecAggConfig(num_clients=20, security="active", threshold=2, colluding_fraction=0.1)


def test_the_authority_is_not_the_server():
    authority = EnrollmentAuthority()
    enrollments = enroll_in_process([1, 2, 3], authority=authority)
    assert enrollments[1].certificate.authority == authority.public
    assert all(e.certificate is enrollments[1].certificate for e in enrollments.values())


def test_signatures_collected_in_a_copy_of_the_round_count_for_nothing():
    """Review finding: the server runs copies of one round id (the members on fresh processes, with fresh round
    keys) to collect a signature on each statement. The statement binds the key table, so the copy's signatures
    do not verify in the real round."""
    enrollments = enroll_in_process(range(1, 8))

    def fresh():  # a member restarted: the same identity, no in-process record of the rounds it joined
        return {c: Enrollment(c, e.identity, e.certificate) for c, e in enrollments.items()}

    real, copy = Round(7, "active", enrollments=fresh()), Round(7, "active", enrollments=fresh())
    view = real.request(range(1, 8))
    assert view == copy.request(range(1, 8))  # the same round id and survivors: only the keys differ
    signatures = {c: client.check_consistency(view).signature for c, client in copy.clients.items()}
    signatures[1] = real.clients[1].check_consistency(view).signature  # the victim's own, in the real round
    with pytest.raises(ConsistencyCheckFailed) as caught:
        real.clients[1].unmask(m.SignatureList(round_id=ROUND, sender=0, signatures=signatures))
    assert set(caught.value.disagreeing) == set(range(2, 8))


def test_a_member_joins_each_round_id_once():
    enrollments = enroll_in_process([1, 2, 3])
    config = SecAggConfig(num_clients=3, security="active")
    layout = PayloadLayout.for_arrays([np.zeros(2)], config)
    SecAggClient(1, config, ROUND, layout, enrollment=enrollments[1]).advertise_keys()
    again = SecAggClient(1, config, ROUND, layout, enrollment=enrollments[1])
    with pytest.raises(WrongRound, match="already took part"):
        again.advertise_keys()
    SecAggClient(1, config, "another-round", layout, enrollment=enrollments[1]).advertise_keys()


def test_a_sparse_graph_is_refused_under_active_security():
    """Review finding: with a server-chosen roster and round id, a SecAgg+ group of t = 21 could be filled with 21
    of the 100 colluders of 1,000 clients."""
    with pytest.raises(ValueError, match="harary.*cannot be used with security: 'active'"):
        SecAggConfig(num_clients=1000, graph="harary", security="active")
    assert not SecAggConfig(num_clients=10, graph="harary", security="active").sparse  # complete: allowed


def test_an_expired_certificate_is_refused_when_the_round_starts():
    authority = EnrollmentAuthority()
    identity = Identity.generate()
    certificate = authority.certify("s", {1: identity.public}, valid_seconds=10, not_before=1_000_000)
    config = SecAggConfig(num_clients=2, security="active")
    with pytest.raises(InvalidCertificate, match="valid from"):
        SecAggClient(1, config, ROUND, PayloadLayout.for_arrays([np.zeros(2)], config),
                     enrollment=Enrollment(1, identity, certificate))


def dp_round(security: str) -> tuple[Round, object]:
    """Eleven clients of distributed DP (epsilon 3 over 40 rounds), each submitting only its noise share (a zero
    update): what the server recovers of one client is exactly the noise that protects it."""
    from privfer.privacy.distributed import calibrate_distributed, encode_contribution, noise_generator

    plan = calibrate_distributed(epsilon=3.0, delta=1e-5, max_grad_norm=1.0, dimension=4000, sample_rate=1.0,
                                 steps=40, clients=11, records=11, min_inputs_fraction=0.9, colluding_fraction=0.1,
                                 rounding_overhead=0.01, modulus_bits=32, max_noise_multiplier=1e4)
    updates = {c: [encode_contribution(np.zeros(plan.dimension), plan, noise_generator())] for c in range(1, 12)}
    game = Round(11, security, min_inputs=plan.min_inputs, updates=updates, sum_bound=plan.sum_bound,
                 modulus_bits=plan.modulus_bits)
    return game, plan


def test_an_isolated_victims_release_carries_only_its_share_under_semi_honest_security():
    """Attack 4 of issue 24: through the split view the server reads one client's contribution, whose noise
    variance is its share, mu / (min_inputs - colluders), not the mu its ledger counts on."""
    game, plan = dp_round("semi_honest")
    _, victim, t, seed_shares, key_shares, _ = split_view_attack("semi_honest", game)
    released = game.recover(victim, rebuild(seed_shares, t), rebuild(key_shares, t)).astype(np.float64)
    np.testing.assert_array_equal(released, game.updates[victim][0])
    assert plan.honest == 9 and released.var() == pytest.approx(plan.mu / 9, rel=0.15)
    assert released.var() < plan.mu / 5  # far less noise than any sum the ledger accounts for


def test_an_isolated_victims_release_is_refused_under_active_security():
    game, plan = dp_round("active")
    _, _, _, seed_shares, key_shares, refusals = split_view_attack("active", game)
    assert len(refusals) == 10 and len(seed_shares) == len(key_shares) == 1  # only the colluder's own shares


def test_four_clients_on_a_zero_model_and_the_victim_on_the_real_one_release_nothing():
    """Attack 3 exactly: four clients get a model whose update is zero, the victim the real one. Four of five
    would have passed a count threshold (T = 4) and released the victim's update as the "sum"; since every
    survivor must sign, the victim's refusal to sign the others' statement stops them all."""
    contexts = {c: context_digest(b"real" if c == 5 else b"zero-update") for c in range(1, 6)}
    game = Round(5, "active", contexts=contexts)
    assert game.config.consistency_threshold(5) == 4
    request = game.request(range(1, 6))
    signatures = {c: client.check_consistency(request).signature for c, client in game.clients.items()}
    for c in range(1, 5):
        with pytest.raises(ConsistencyCheckFailed) as caught:
            game.clients[c].unmask(m.SignatureList(round_id=ROUND, sender=0, signatures=signatures))
        assert caught.value.disagreeing == (5,)


def test_colluders_are_counted_against_the_whole_study():
    """Review finding: the server picks a round's members, so it can gather every colluding member of the study into
    one small round. 30 members, 10% collude: every client assumes 3 colluders whatever the round's size."""
    enrolled = enroll_in_process(range(1, 31))
    game = Round(6, "active", enrollments={c: enrolled[c] for c in range(1, 7)}, colluding_fraction=0.1)
    assert game.config.colluders == 1 and game.clients[1].colluders == 3
    # the split the round's own count (c = 1, T = 4) would have let through: victim 1 survived for clients 1-2
    # and the colluders 4-6; dropped for client 3. T is now floor((6 + 3) / 2) + 1 = 5.
    view_b = game.request([3, 4, 5, 6])
    with pytest.raises(RoundAborted, match="needs at least 5"):
        game.clients[3].check_consistency(view_b)
    # and a round whose Shamir threshold the study's colluders reach is refused before anything is shared
    small = SecAggConfig(num_clients=5, security="active", colluding_fraction=0.1)
    layout = PayloadLayout.for_arrays([np.zeros(2)], small)
    clients = {c: SecAggClient(c, small, "small", layout, enrollment=enrolled[c]) for c in range(1, 6)}
    adverts = {c: client.advertise_keys() for c, client in clients.items()}
    roster = m.KeyRoster(round_id="small", sender=0, keys={c: (a.c_public, a.s_public) for c, a in adverts.items()},
                         signatures={c: a.signature for c, a in adverts.items()})
    with pytest.raises(RoundAborted, match="threshold 3 does not exceed the 3 colluders"):
        clients[1].share_keys(roster)


# -- attack 6: a dishonest dealer, and the complaint round ----------------------------------------------------

def complaint_round(*, bad_dealer=None, victim_holder=5, tamper_transit=False, false_complaint=False):
    """Seven enrolled clients; ``bad_dealer`` hands ``victim_holder`` a ciphertext that does not open and signs its
    deal over it (a dishonest dealer can: the key is its own). ``tamper_transit``: the SERVER alters that
    ciphertext on the way instead. ``false_complaint``: the holder accuses an honest dealer, revealing the true key.
    Returns the server's sum (or the exception) and the server."""
    from privfer.secagg.keys import PURPOSE_SHARE
    from privfer.secagg.statements import deal_leaf, deal_statement, merkle_levels

    enrollments = enroll_in_process(range(1, 8))
    config = SecAggConfig(num_clients=7, security="active", encoding="integer", integer_sum_bound=1 << 20)
    updates = {c: [np.array([c, -c, 10 * c])] for c in range(1, 8)}
    layout = PayloadLayout.for_arrays(updates[1], config)
    clients = {c: SecAggClient(c, config, ROUND, layout, enrollment=enrollments[c]) for c in updates}
    server = SecAggServer(config, ROUND, layout, certificate=enrollments[1].certificate)
    for c, client in clients.items():
        server.receive_advertise(client.advertise_keys(), peer=c)
    roster = server.key_roster()
    for c, client in clients.items():
        deal = client.share_keys(roster)
        if c == bad_dealer:
            blob = bytearray(deal.ciphertexts[victim_holder])
            blob[-1] ^= 1
            ciphertexts = {**deal.ciphertexts, victim_holder: bytes(blob)}
            holders = sorted(deal.commitments)
            root = merkle_levels([deal_leaf(h, ciphertexts.get(h, b""), deal.commitments[h]) for h in holders])[-1][0]
            signature = enrollments[c].identity.sign(deal_statement(enrollments[c].study, ROUND, c, len(holders),
                                                                    root, clients[c]._roster_digest))
            deal = deal.model_copy(update={"ciphertexts": ciphertexts, "signature": signature})
        server.receive_share_keys(deal, peer=c)
    for c, bundle in server.forward_shares().items():
        if tamper_transit and c == victim_holder:
            blob = bytearray(bundle.ciphertexts[2])
            blob[-1] ^= 1
            bundle = bundle.model_copy(update={"ciphertexts": {**bundle.ciphertexts, 2: bytes(blob)}})
        masked = clients[c].masked_input(bundle, updates[c])
        if false_complaint and c == victim_holder:
            key = agree(clients[c]._keys.c_private, roster.keys[2][0], PURPOSE_SHARE, ROUND, 2, c)
            masked = masked.model_copy(update={"complaints": {2: key}})
        server.receive_masked_input(masked, peer=c)
    request = server.unmask_request()
    for c in request.survivors:
        server.receive_consistency(clients[c].check_consistency(request), peer=c)
    signatures = server.signature_list()
    for c in request.survivors:
        server.receive_unmask(clients[c].unmask(signatures), peer=c)
    return server.finish(), updates, server


def test_a_dealer_whose_signed_share_does_not_open_is_blamed_and_the_round_continues_without_it():
    summed, updates, _ = complaint_round(bad_dealer=2)
    assert summed.blamed == {2: (5,)} and summed.false_complaints == {}
    assert summed.included == (1, 3, 4, 5, 6, 7)  # the holder stays; the dealer is left out, as if dropped
    np.testing.assert_array_equal(summed.decoded.arrays[0], sum(updates[c][0] for c in summed.included))


def test_under_semi_honest_security_the_same_dealer_silently_removes_the_holder():
    """What attack 6 did before: the holder aborts, nobody is blamed."""
    from privfer.secagg import ShareAuthenticationError

    config = SecAggConfig(num_clients=7)
    layout = PayloadLayout.for_arrays([np.zeros(2)], config)
    clients = {c: SecAggClient(c, config, ROUND, layout) for c in range(1, 8)}
    server = SecAggServer(config, ROUND, layout)
    for c, client in clients.items():
        server.receive_advertise(client.advertise_keys(), peer=c)
    roster = server.key_roster()
    for c, client in clients.items():
        deal = client.share_keys(roster)
        if c == 2:
            blob = bytearray(deal.ciphertexts[5])
            blob[-1] ^= 1
            deal = deal.model_copy(update={"ciphertexts": {**deal.ciphertexts, 5: bytes(blob)}})
        server.receive_share_keys(deal, peer=c)
    bundles = server.forward_shares()
    with pytest.raises(ShareAuthenticationError):
        clients[5].masked_input(bundles[5], [np.zeros(2)])
    assert clients[5].stage == "aborted"


def test_a_server_that_alters_a_ciphertext_gets_no_key():
    """If the server could make a holder complain about a ciphertext it altered, the revealed key would open the
    original it kept. The deal's signature covers the ciphertext: the holder sees the alteration and reveals
    nothing."""
    with pytest.raises(InvalidSignature, match="client 2's deal"):
        complaint_round(tamper_transit=True)


def test_a_false_complaint_is_exposed_and_the_honest_dealer_stays():
    summed, updates, _ = complaint_round(false_complaint=True)
    assert summed.blamed == {} and summed.false_complaints == {5: (2,)}
    assert summed.included == tuple(range(1, 8))
    np.testing.assert_array_equal(summed.decoded.arrays[0], sum(updates[c][0] for c in range(1, 8)))


def test_a_revealed_share_key_opens_only_the_dealers_ciphertext_to_the_holder():
    """Review finding (A1): share keys are directed. The key a holder reveals about dealer d opens E(d -> holder)
    only, never the holder's own deal to d (which would hand the server a share of the holder's secrets)."""
    from privfer.secagg import ShareAuthenticationError
    from privfer.secagg.keys import PURPOSE_SHARE, decrypt_share

    game = Round(5, "active")
    forwarded_to_2 = game.server._shares[3][2]  # E(3 -> 2)
    own_deal_of_2 = game.server._shares[2][3]  # E(2 -> 3)
    revealed = agree(game.clients[2]._keys.c_private, game.keys[3][0], PURPOSE_SHARE, ROUND, 3, 2)
    digest = game.clients[2]._roster_digest
    decrypt_share(revealed, forwarded_to_2, ROUND, 3, 2, digest)  # opens the dealer's ciphertext
    with pytest.raises(ShareAuthenticationError):
        decrypt_share(revealed, own_deal_of_2, ROUND, 2, 3, digest)


def test_a_holder_shown_another_roster_reveals_no_key():
    """Review finding (A1): the server gives each honest client a roster differing only in a colluder's keys, so
    no share opens. The deal's signature covers the dealer's roster digest: the holder sees an invalid deal and
    aborts without complaining (no key leaves it)."""
    game = Round(5, "active")
    victim = SecAggClient(1, game.config, "split-roster", game.layout, enrollment=Enrollment(
        1, game.enrollments[1].identity, game.enrollments[1].certificate))
    with pytest.raises(InvalidSignature):
        _deal_check_with_roster(victim)


def _deal_check_with_roster(client):
    """Client 1 saw roster digest R; the deal it is forwarded (dealer 1's key, a valid tree) was signed for S."""
    from privfer.secagg.statements import deal_leaf, deal_statement, merkle_levels, merkle_path

    client._members = ((1, 5),)
    client._roster_digest = b"R" * 32  # what this client saw
    dealer = client.enrollment  # a stand-in dealer key: signs for its own (different) roster digest
    holders = list(range(1, 6))
    leaves = [deal_leaf(h, b"ct", bytes(64)) for h in holders]
    levels = merkle_levels(leaves)
    signature = dealer.identity.sign(deal_statement(dealer.study, client.round_id, 1, 5, levels[-1][0], b"S" * 32))
    forwarded = m.ForwardedShares(round_id=client.round_id, sender=0, receiver=1, ciphertexts={2: b"ct"},
                                  commitments={2: bytes(64)}, proofs={2: signature + b"".join(merkle_path(levels, 0))})
    client._check_deal(1, b"ct", forwarded)


def test_a_forwarded_share_from_the_client_itself_is_refused():
    """Review finding (A2): the server forwards a client its own (empty) leaf as if from a peer."""
    game = Round(5, "active", seed=4)
    client = SecAggClient(1, game.config, "self-leaf", game.layout, enrollment=Enrollment(
        1, game.enrollments[1].identity, game.enrollments[1].certificate))
    client.stage, client._group, client._keys = "shared", frozenset(range(1, 6)), game.clients[1]._keys
    forwarded = m.ForwardedShares(round_id="self-leaf", sender=0, receiver=1, ciphertexts={1: b""},
                                  commitments={1: bytes(64)})
    with pytest.raises(UnknownSender, match="outside this client's group"):
        client.masked_input(forwarded, game.updates[1])


def test_a_refused_complaint_blames_no_one():
    """Review finding (A3): a complaint table with one valid and one bogus entry is refused whole."""
    game = Round(7, "active")
    server = game.server
    with pytest.raises(UnknownSender):
        server._check_complaints(5, {2: bytes(32), 99: bytes(32)})
    assert server.blamed == {} and server.false_complaints == {}
