"""The client side of secure aggregation: one method per protocol stage.

Stages (Bonawitz et al. 2017, section 4): AdvertiseKeys -> ShareKeys ->
MaskedInput -> Unmask. The client masks its plaintext vector x_u as

    y_u = x_u + PRG(b_u) + sum_{v in P_u, u < v} PRG(s_uv) - sum_{v in P_u, u > v} PRG(s_uv)   (mod 2^k)

where b_u is a fresh self-mask seed, s_uv the X25519/HKDF mask seed shared
with peer v, and P_u the peers (its neighbours on the round's graph) whose
shares it received. Shares of b_u and of the mask private key go, encrypted,
to its group. Each stage runs once; every incoming message is checked for the
round, the sender and the stage, and the client refuses any unmask request
that could reveal its peers' individual inputs.
"""

from __future__ import annotations

from bisect import bisect_left
import time
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, Mapping, Sequence

import numpy as np

from privfer.secagg import client_state, shamir
from privfer.secagg.config import SecAggConfig
from privfer.secagg.errors import (
    ConsistencyCheckFailed,
    DuplicateSender,
    InconsistentShares,
    InvalidInput,
    InvalidSignature,
    MalformedMessage,
    RoundAborted,
    SecAggError,
    ShareAuthenticationError,
    UnknownSender,
    UnsafeUnmaskRequest,
    WrongStage,
)
from privfer.secagg.graph import client_group
from privfer.secagg.identity import SIGNATURE_BYTES, Enrollment, verify_signature
from privfer.secagg.idsets import Runs, expand_runs, id_runs, in_runs, runs_size, runs_within
from privfer.secagg.keys import (
    PURPOSE_MASK,
    PURPOSE_SHARE,
    KeyPairs,
    agree,
    derive_key,
    encrypt_share,
    seed_commitment,
    share_commitments,
    shared_secret,
)
from privfer.secagg.codec import SERVER, id_set
from privfer.secagg.messages import (
    AdvertiseKeys,
    ConsistencySignature,
    ForwardedShares,
    GroupRoster,
    GroupUnmaskRequest,
    KeyRoster,
    MaskedInput,
    Message,
    ShareKeys,
    SignatureList,
    UnmaskRequest,
    UnmaskResponse,
    check_header,
    decode,
)
from privfer.secagg.payload import PayloadLayout
from privfer.secagg.prg import SEED_BYTES, MaskExpander
from privfer.secagg.quantize import ClippingReport
from privfer.secagg.randomness import SYSTEM, Randomness
from privfer.secagg.shares import open_share, share_plaintext
from privfer.secagg.statements import (
    CONTEXT_BYTES,
    cached_config_digest,
    cached_ids_digest,
    NO_CONTEXT,
    advertise_statement,
    consistency_statement,
    deal_leaf,
    deal_statement,
    ids_digest,
    merkle_levels,
    merkle_root_from,
    roster_digest,
)

_TABLES: list[tuple[object, bytes]] = []


def _table_digest(keys: dict[int, tuple[bytes, bytes]]) -> bytes:
    """:func:`roster_digest` of a full roster, cached by object identity (a kept reference, so an id is never
    reused): the clients of an in-process round share one decoded broadcast and hash it once, not n times."""
    for table, digest in _TABLES:
        if table is keys:
            return digest
    digest = roster_digest(keys)
    _TABLES.insert(0, (keys, digest))
    del _TABLES[4:]
    return digest


def _check_context(context: bytes) -> bytes:
    if not isinstance(context, (bytes, bytearray)) or len(context) != CONTEXT_BYTES:
        raise InvalidInput(f"a round's context is a {CONTEXT_BYTES}-byte digest of the model and plan "
                           "(privfer.secagg.statements.context_digest)")
    return bytes(context)


@lru_cache(maxsize=4)
def _listed(ids: tuple[int, ...], members: Runs) -> bool:
    """Whether every id is in ``members`` (cached: the clients of an in-process round check a request once)."""
    return all(in_runs(members, v) for v in ids)


class SecAggClient:
    """One participant of one secure-aggregation round.

    Under ``config.security == "active"`` the client is an enrolled member: ``enrollment`` carries its member id
    (which must be ``client_id``), its long-term signing key and the roster certificate it checked against its
    pinned authority key. ``context`` is the 32-byte digest of the model and plan this round trains with
    (:func:`privfer.secagg.statements.context_digest`); it can also be given to :meth:`masked_input`, when the
    model arrives with that stage. Two clients with different contexts sign different statements, and no share
    is revealed unless enough members signed the same one.
    """

    def __init__(
        self,
        client_id: int,
        config: SecAggConfig,
        round_id: str,
        layout: PayloadLayout,
        randomness: Randomness = SYSTEM,
        *,
        enrollment: Enrollment | None = None,
        context: bytes = NO_CONTEXT,
    ) -> None:
        if isinstance(client_id, bool) or not isinstance(client_id, (int, np.integer)) \
                or not 1 <= client_id <= shamir.PRIME - 1:
            raise InvalidInput(f"client ids must be integers in 1..{shamir.PRIME - 1}, got {client_id!r}")
        if config.security == "active":
            if not isinstance(enrollment, Enrollment):
                raise InvalidInput("security 'active' needs the client's enrollment (member id, identity key and "
                                   "the roster certificate checked against the pinned authority key)")
            if enrollment.member != client_id:
                raise InvalidInput(f"client {client_id} is enrolled as member {enrollment.member}: under active "
                                   "security a client's id is its member id")
            enrollment.check_validity()
        self.enrollment = enrollment
        self.context = _check_context(context)
        self.client_id = client_id
        self.config = config
        self.round_id = round_id
        self.layout = layout
        self.randomness = randomness
        self.stage = "new"
        self.clipping = ClippingReport()
        self._keys: KeyPairs | None = None
        self._roster: dict[int, tuple[bytes, bytes]] = {}
        self._group: frozenset[int] = frozenset()
        self._members: Runs = ()  # every client that advertised keys (the roster's ids), as runs
        self._peers: frozenset[int] = frozenset()  # neighbours whose shares arrived
        self._held: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # owner -> (seed share, key share)
        self._self_seed = b""
        self._roster_digest = b""  # digest of the roster (binds every share and the signed statement)
        self._request = b""  # active: the unmask request this client signed, kept until the signatures arrive
        self._complaints: dict[int, bytes] = {}  # dealer -> revealed share key, sent with the masked input
        # holder -> the X25519 secret of this client's and its share keys (c), kept from dealing to opening the
        # holder's deal (both directed keys derive from it); in memory only, like the private key itself
        self._share_secrets: dict[int, bytes] = {}
        self.mask_seconds = 0.0  # PRG expansion + modular addition of all masks (benchmarks compare it with the cipher)

    # -- saving and restoring (privfer.secagg.client_state) ------------------------------
    def export_state(self) -> bytes:
        """The client's whole protocol state as bytes (:func:`privfer.secagg.client_state.export_state`: it holds
        the round's private keys and the shares it holds; keep it where the client keeps its keys)."""
        return client_state.export_state(self)

    @classmethod
    def restore(cls, state: bytes, randomness: Randomness = SYSTEM, *,
                enrollment: Enrollment | None = None) -> "SecAggClient":
        """Rebuild a client from :meth:`export_state`'s bytes (:func:`privfer.secagg.client_state.restore`);
        raises :class:`CorruptState` naming what is wrong."""
        return client_state.restore(cls, state, randomness, enrollment=enrollment)

    def _advance(self, expected: str, to: str) -> None:
        if self.stage != expected:
            raise WrongStage(f"client {self.client_id} is at stage {self.stage!r}, not {expected!r}")
        self.stage = to

    @contextmanager
    def _or_abort(self) -> Iterator[None]:
        """Any failure inside a stage ends the client's part in the round: no later stage will run."""
        try:
            yield
        except BaseException:
            self.stage = "aborted"
            self._share_secrets = {}
            raise

    # -- stage 0 ---------------------------------------------------------------
    def advertise_keys(self) -> AdvertiseKeys:
        if self.enrollment is not None and self.config.security == "active":
            self.enrollment.claim(self.round_id)
        self._advance("new", "advertised")
        self._keys = KeyPairs.generate(self.randomness)
        signature = b""
        if self.enrollment is not None and self.config.security == "active":
            signature = self.enrollment.identity.sign(advertise_statement(
                self.enrollment.study, self.round_id, self.client_id, self._keys.c_public, self._keys.s_public))
        return AdvertiseKeys(round_id=self.round_id, sender=self.client_id, c_public=self._keys.c_public,
                             s_public=self._keys.s_public, signature=signature)

    # -- stage 1 ---------------------------------------------------------------
    def _expect(self, message: Message, full: type[Message], group: type[Message]) -> None:
        """The roster setting fixes which of the two forms of a broadcast this client accepts."""
        wanted = group if self.config.roster == "group" else full
        if not isinstance(message, wanted):
            raise WrongStage(f"the round's roster is {self.config.roster!r}: expected a {wanted.__name__}, "
                             f"got a {type(message).__name__}")
        if isinstance(message, (GroupRoster, GroupUnmaskRequest)) and message.receiver != self.client_id:
            raise UnknownSender(f"a {type(message).__name__} for client {message.receiver} was delivered to "
                                f"client {self.client_id}")

    def _group_of(self, roster: KeyRoster | GroupRoster) -> frozenset[int]:
        """This client's group on the round's graph, which it derives itself from the ids of every client that
        advertised (section 4) — in either form; a group roster must carry exactly that group's keys."""
        # the ids from the keys themselves (full form), or the runs re-checked (an object passed in process skips
        # the decoder's checks)
        members = id_runs(roster.keys) if isinstance(roster, KeyRoster) else id_set(roster.members)
        if runs_size(members) > self.config.num_clients:
            raise MalformedMessage(f"the roster lists {runs_size(members)} clients, the round has at most "
                                   f"{self.config.num_clients}")
        if not in_runs(members, self.client_id):
            raise UnknownSender(f"the roster does not list client {self.client_id}")
        group = client_group(self.round_id, members, self.config.degree, self.client_id)
        if isinstance(roster, GroupRoster) and set(roster.keys) != group:
            raise MalformedMessage(f"the group roster's keys are not client {self.client_id}'s group on the round's "
                                   f"graph ({len(roster.keys)} listed, {len(group)} in the group)")
        self._members = members
        return group

    def _open_share(self, key: bytes, blob: bytes, sender: int,
                    forwarded: ForwardedShares) -> tuple[np.ndarray, np.ndarray]:
        return open_share(key, blob, self.round_id, sender, self.client_id, self._roster_digest,
                          forwarded.commitments.get(sender))

    def _deal_holders(self, dealer: int) -> tuple[int, ...]:
        """The holders of ``dealer``'s shares in id order (its group; every member on the complete graph)."""
        if runs_size(self._members) - 1 <= self.config.degree:
            return expand_runs(self._members)
        return tuple(sorted(client_group(self.round_id, self._members, self.config.degree, dealer)))

    def _check_deal(self, dealer: int, blob: bytes, forwarded: ForwardedShares) -> None:
        """Active security: the dealer's signature on its deal, through this client's hash-tree path, covers the
        forwarded ciphertext and commitments. Otherwise the server (or the transport) altered them:
        :class:`InvalidSignature`, and this client reveals nothing — a complaint could otherwise hand the server
        the key to a share it has the original ciphertext of."""
        assert self.enrollment is not None
        proof = forwarded.proofs.get(dealer, b"")
        committed = forwarded.commitments.get(dealer, b"")
        holders = self._deal_holders(dealer)
        index = bisect_left(holders, self.client_id)
        if len(proof) < SIGNATURE_BYTES or (len(proof) - SIGNATURE_BYTES) % 32 or len(committed) != 64 \
                or index >= len(holders) or holders[index] != self.client_id:
            raise InvalidSignature(f"client {dealer}'s deal proof for client {self.client_id} is missing or malformed")
        path = [proof[i:i + 32] for i in range(SIGNATURE_BYTES, len(proof), 32)]
        try:
            root = merkle_root_from(deal_leaf(self.client_id, blob, committed), index, len(holders), path)
        except ValueError:
            raise InvalidSignature(f"client {dealer}'s deal proof has a path of the wrong length") from None
        verify_signature(self.enrollment.certificate.public_key(dealer),
                         deal_statement(self.enrollment.study, self.round_id, dealer, len(holders), root,
                                        self._roster_digest),
                         proof[:SIGNATURE_BYTES], f"client {dealer}'s deal")

    def _check_roster_keys(self, roster: KeyRoster | GroupRoster) -> None:
        """No key twice (a server reusing one client's key for another); under active security every entry is an
        enrolled member whose signature on (study, round, id, keys) verifies against the certificate — a sybil or a
        server-made key is refused here, before anything is shared with it."""
        seen: set[bytes] = set()
        for v, (c_public, s_public) in roster.keys.items():
            if c_public in seen or s_public in seen or c_public == s_public:
                raise DuplicateSender(f"the roster lists a public key twice (client {v})")
            seen.update((c_public, s_public))
        if self.config.security != "active":
            return
        assert self.enrollment is not None
        certificate = self.enrollment.certificate
        if set(roster.signatures) != set(roster.keys):
            raise UnknownSender("under active security every roster entry carries its advertisement signature")
        for v, (c_public, s_public) in roster.keys.items():
            verify_signature(certificate.public_key(v),
                             advertise_statement(certificate.study, self.round_id, v, c_public, s_public),
                             roster.signatures[v], f"client {v}'s key advertisement")

    def share_keys(self, roster: KeyRoster | GroupRoster) -> ShareKeys:
        check_header(roster, self.round_id, SERVER)
        self._expect(roster, KeyRoster, GroupRoster)
        self._advance("advertised", "shared")
        with self._or_abort():
            assert self._keys is not None
            mine = roster.keys.get(self.client_id)
            if mine != (self._keys.c_public, self._keys.s_public):
                raise UnknownSender(f"the roster does not list client {self.client_id} with its own keys")
            self._group = self._group_of(roster)
            self._check_roster_keys(roster)
            if self.config.security == "active" and self.config.group_threshold <= self.colluders:
                raise RoundAborted(
                    f"client {self.client_id}: the round's Shamir threshold {self.config.group_threshold} does not "
                    f"exceed the {self.colluders} colluders the study may hold (colluding_fraction "
                    f"{self.config.colluding_fraction:g} of {len(self.enrollment.certificate.members)} members, "
                    "any of whom the server may put in this round): they alone could rebuild its secrets")
            self._roster = {v: roster.keys[v] for v in self._group}  # only its group's keys are ever used
            # a full roster binds the key table (who, with which round keys); a group roster its ids (the client
            # sees no other keys)
            self._roster_digest = (_table_digest(roster.keys) if isinstance(roster, KeyRoster)
                                   else ids_digest(self._members, runs=True))
            threshold = self.config.group_threshold
            if len(self._group) < threshold:
                self.stage = "aborted"
                raise RoundAborted(f"client {self.client_id} has {len(self._group)} group members, the threshold is {threshold}")

            self._self_seed = self.randomness.bytes(SEED_BYTES)
            holders = sorted(self._group)
            shares = shamir.split([self._self_seed, self._keys.s_secret()], holders, threshold, self.randomness)
            ciphertexts: dict[int, bytes] = {}
            commitments: dict[int, bytes] = {}
            for index, holder in enumerate(holders):
                seed_share, key_share = shares[index, 0], shares[index, 1]
                commitments[holder] = share_commitments(self.round_id, self.client_id, holder,
                                                        shamir.share_to_bytes(seed_share),
                                                        shamir.share_to_bytes(key_share))
                if holder == self.client_id:
                    self._held[holder] = (seed_share, key_share)  # our own share never leaves the client
                    continue
                secret = self._share_secrets[holder] = shared_secret(self._keys.c_private, self._roster[holder][0])
                key = derive_key(secret, PURPOSE_SHARE, self.round_id, self.client_id, holder)
                plaintext = share_plaintext(self.client_id, holder, seed_share, key_share)
                ciphertexts[holder] = encrypt_share(key, plaintext, self.round_id, self.client_id, holder,
                                                    self._roster_digest, self.randomness)
            signature = b""
            if self.config.security == "active":  # signed: a holder can prove a ciphertext it cannot open is ours
                assert self.enrollment is not None
                leaves = [deal_leaf(h, ciphertexts.get(h, b""), commitments[h]) for h in holders]
                signature = self.enrollment.identity.sign(deal_statement(
                    self.enrollment.study, self.round_id, self.client_id, len(holders),
                    merkle_levels(leaves)[-1][0], self._roster_digest))
            return ShareKeys(round_id=self.round_id, sender=self.client_id, ciphertexts=ciphertexts,
                             commitments=commitments,
                             seed_commitment=seed_commitment(self.round_id, self.client_id, self._self_seed),
                             signature=signature)

    # -- stage 2 ---------------------------------------------------------------
    def check_forwarded(self, forwarded: ForwardedShares) -> None:
        """The checks of :meth:`masked_input` that need no update: callers that compute the update only for this
        stage (train on it) run them first, so a replayed or misrouted stage costs nothing."""
        check_header(forwarded, self.round_id, SERVER)
        if forwarded.receiver != self.client_id:
            raise UnknownSender(f"shares addressed to {forwarded.receiver} were delivered to {self.client_id}")
        if self.stage != "shared":
            raise WrongStage(f"client {self.client_id} is at stage {self.stage!r}, not 'shared'")

    def masked_input(
        self,
        forwarded: ForwardedShares,
        update: Sequence[np.ndarray],
        example_count: int = 1,
        metrics: Mapping[str, float] | None = None,
        *,
        context: bytes | None = None,
    ) -> MaskedInput:
        """``context``: the digest of the model and plan this update was trained from, when it was not known at
        construction (it goes into the statement the client signs under active security)."""
        self.check_forwarded(forwarded)
        # The caller's input first: a rejected update (InvalidInput) changes nothing, and the client can be given
        # a corrected one for the same stage.
        fixed_context = self.context if context is None else _check_context(context)
        words, report = self.layout.encode(update, example_count, metrics, self.randomness)
        self._advance("shared", "masked")
        self.context = fixed_context
        with self._or_abort():
            assert self._keys is not None
            strangers = set(forwarded.ciphertexts) - (set(self._group) - {self.client_id})
            if strangers:
                raise UnknownSender(f"shares from clients outside this client's group: {sorted(strangers)[:5]}")
            active = self.config.security == "active"
            complaints: dict[int, bytes] = {}
            for sender, blob in forwarded.ciphertexts.items():
                # directed: the key of sender -> this client (this client's own deal to sender used another)
                secret = self._share_secrets.get(sender)  # absent in a client restored from its saved state
                if secret is None:
                    secret = shared_secret(self._keys.c_private, self._roster[sender][0])
                key = derive_key(secret, PURPOSE_SHARE, self.round_id, sender, self.client_id)
                if active:  # the dealer's signature covers this very ciphertext and commitment, or nothing is said
                    self._check_deal(sender, blob, forwarded)
                try:
                    self._held[sender] = self._open_share(key, blob, sender, forwarded)
                except (ShareAuthenticationError, InconsistentShares, UnknownSender, MalformedMessage):
                    if not active:
                        raise
                    # Bonawitz et al.'s complaint: the dealer signed a share that does not open (or does not match
                    # its commitments). Revealing the pair's key exposes only that signed ciphertext — garbage, or
                    # this client's own share from a dealer that cheated — and lets anyone check the accusation.
                    complaints[sender] = key
            self._complaints = complaints
            self._share_secrets = {}  # every deal is opened: no later stage needs them
            self._peers = frozenset(forwarded.ciphertexts)
            if len(self._peers) + 1 < self.config.group_threshold:
                self.stage = "aborted"
                raise RoundAborted(
                    f"client {self.client_id}: only {len(self._peers) + 1} of its group shared keys, "
                    f"the threshold is {self.config.group_threshold}"
                )

            self.clipping = report
            bits = self.config.modulus_bits
            seeds = {
                peer: agree(self._keys.s_private, self._roster[peer][1], PURPOSE_MASK, self.round_id, self.client_id, peer)
                for peer in sorted(self._peers)
            }
            started = time.perf_counter()
            expander = MaskExpander(words.size, bits)
            masked = words + expander.expand(self._self_seed)
            for peer, seed in seeds.items():
                if self.client_id < peer:
                    masked += expander.expand(seed)
                else:
                    masked -= expander.expand(seed)
            self.mask_seconds = time.perf_counter() - started
            return MaskedInput(round_id=self.round_id, sender=self.client_id, modulus_bits=bits, vector=masked,
                               complaints=self._complaints)

    @property
    def colluders(self) -> int:
        """The colluders this client assumes (active security: counted against the whole study, SPEC 5.2)."""
        if self.enrollment is None:
            return self.config.colluders
        return self.config.study_colluders(len(self.enrollment.certificate.members))

    # -- stage 3 ---------------------------------------------------------------
    def _vet(self, request: UnmaskRequest | GroupUnmaskRequest) -> tuple[frozenset[int], frozenset[int]]:
        """Every check an unmask request must pass before this client answers it (or, under active security,
        signs it); returns the survivors of its group and the dropped clients it was told of."""
        check_header(request, self.round_id, SERVER)
        self._expect(request, UnmaskRequest, GroupUnmaskRequest)
        if isinstance(request, GroupUnmaskRequest):
            dropped = frozenset(request.dropped)
            if not dropped <= self._group:
                raise MalformedMessage(f"the group unmask request lists as dropped clients outside client "
                                       f"{self.client_id}'s group: {sorted(dropped - self._group)[:5]}")
            inside = runs_within(id_set(request.survivors), self._members)
            survivors = frozenset(v for v in self._group if request.survived(v))  # the group's: all it answers for
        else:
            survivors, dropped = request.survivor_set, request.dropped_set
            inside = _listed(request.survivors, self._members) and _listed(request.dropped, self._members)
        if not inside:  # an input the roster never had would count towards min_inputs
            raise UnsafeUnmaskRequest("the unmask request lists clients the roster did not")
        known = set(self._peers) | {self.client_id}
        both = known & survivors & dropped  # the client holds shares of its group only: those are what it guards
        if both:
            raise UnsafeUnmaskRequest(
                f"clients {sorted(both)[:5]} are listed as both survived and dropped; "
                "answering would reveal both their self mask and their pairwise masks"
            )
        if self.client_id in dropped or self.client_id not in survivors:
            raise UnsafeUnmaskRequest(f"client {self.client_id} sent its masked input but is not listed as a survivor")
        minimum = self.config.min_inputs
        if minimum is not None and request.included < minimum:
            # The caller's guarantee (e.g. enough noise shares in the sum) needs at least this many inputs.
            raise RoundAborted(
                f"client {self.client_id}: the round includes {request.included} inputs, fewer than the minimum "
                f"{minimum}; refusing to unmask"
            )
        alive = survivors & known
        if len(alive) < self.config.group_threshold:
            raise RoundAborted(
                f"client {self.client_id}: {len(alive)} of its group survived, the threshold is "
                f"{self.config.group_threshold}"
            )
        return survivors, dropped

    def _statement(self, request: UnmaskRequest) -> bytes:
        assert self.enrollment is not None
        return consistency_statement(self.enrollment.study, self.round_id, self._roster_digest,
                                     cached_ids_digest(request.survivors), self.context, cached_config_digest(self.config))

    def check_consistency(self, request: UnmaskRequest) -> ConsistencySignature:
        """Active security, stage 3a: check the unmask request as :meth:`unmask` would, then sign this client's
        statement — the round, its roster's ids, the survivors, its context and the config. Once per round: an
        honest client never signs two statements, which is what makes a split view impossible (SPEC 6.4)."""
        if self.config.security != "active":
            raise WrongStage("the consistency check runs under security 'active' only")
        check_header(request, self.round_id, SERVER)
        self._advance("masked", "signed")
        with self._or_abort():
            self._vet(request)
            needed = self.config.consistency_threshold(runs_size(self._members), self.colluders)
            if request.included < needed:
                raise RoundAborted(f"client {self.client_id}: the round lists {request.included} survivors; active "
                                   f"security needs at least {needed} (of {runs_size(self._members)} listed, "
                                   f"{self.colluders} may collude)")
            self._request = request.to_bytes()
            assert self.enrollment is not None
            return ConsistencySignature(round_id=self.round_id, sender=self.client_id,
                                        signature=self.enrollment.identity.sign(self._statement(request)))

    def _check_signatures(self, signed: SignatureList, request: UnmaskRequest) -> None:
        """Every survivor of the request — at least the consistency threshold of them, checked before signing —
        signed exactly this client's statement; otherwise :class:`ConsistencyCheckFailed` and no share leaves the
        client. Every survivor, not a count: an input is in the sum whether or not its client signed, so a client
        trained from another model must not be a survivor of a statement it did not sign."""
        check_header(signed, self.round_id, SERVER)
        assert self.enrollment is not None
        certificate = self.enrollment.certificate
        statement = self._statement(request)
        missing, disagreeing = [], []
        for survivor in request.survivors:
            signature = signed.signatures.get(survivor)
            if signature is None:
                missing.append(survivor)
                continue
            try:
                verify_signature(certificate.public_key(survivor), statement, signature,
                                 f"client {survivor}'s consistency signature")
            except SecAggError:
                disagreeing.append(survivor)
        if missing or disagreeing:
            raise ConsistencyCheckFailed(
                f"client {self.client_id}: {request.included - len(missing) - len(disagreeing)} of the "
                f"{request.included} survivors signed its view of round {self.round_id!r}; every survivor must"
                + (f"; no signature from {missing[:8]}" if missing else "")
                + (f"; the signatures of {disagreeing[:8]} are on another statement (a different survivor set, "
                   "roster, model or plan) or altered" if disagreeing else ""),
                disagreeing=tuple(disagreeing))

    def unmask(self, message: UnmaskRequest | GroupUnmaskRequest | SignatureList) -> UnmaskResponse:
        """Stage 3: the shares the server needs. Semi-honest: answers the unmask request. Active: answers the
        signature list, after :meth:`check_consistency` signed the request and enough members' signatures verify
        on exactly the same statement."""
        if self.config.security == "active":
            if not isinstance(message, SignatureList):
                raise WrongStage(f"under active security the unmask stage answers a SignatureList (after "
                                 f"check_consistency), not a {type(message).__name__}")
            check_header(message, self.round_id, SERVER)
            self._advance("signed", "unmasked")
            with self._or_abort():
                request = decode(self._request)
                assert isinstance(request, UnmaskRequest)
                self._check_signatures(message, request)
                self._request = b""
                return self._response(*self._vet(request))
        check_header(message, self.round_id, SERVER)
        self._expect(message, UnmaskRequest, GroupUnmaskRequest)
        # Answer at most once per round: a second request could ask for the other share of a peer.
        self._advance("masked", "unmasked")
        return self._response(*self._vet(message))

    def _response(self, survivors: frozenset[int], dropped: frozenset[int]) -> UnmaskResponse:
        known = set(self._held)  # a dealer this client complained about left it no shares to give
        alive = survivors & known
        seed_shares = {v: shamir.share_to_bytes(self._held[v][0]) for v in sorted(alive)}
        key_shares = {v: shamir.share_to_bytes(self._held[v][1]) for v in sorted(dropped & known)}
        return UnmaskResponse(round_id=self.round_id, sender=self.client_id, seed_shares=seed_shares,
                              key_shares=key_shares)
