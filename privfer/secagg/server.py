"""The server side of secure aggregation: collect, route, sum, and remove the masks.

The server only ever holds public keys, ciphertexts it cannot open, masked
vectors and, at the end, Shamir shares of *survivors'* self-mask seeds and of
*dropped* clients' mask keys — never both for one client, because every client
checks the unmask request before answering. From these it removes the masks
and obtains the sum of the survivors' plaintext vectors, nothing else.

Each ``receive_*`` method validates the message (round, stage, sender, no
duplicates, lengths) and raises a specific MessageError; each stage's output
method raises :class:`RoundAborted` when fewer clients than the threshold
remain. :attr:`transcript` records everything the server saw.
"""

from __future__ import annotations

import hmac
from bisect import bisect_left
from typing import Any

import numpy as np

from privfer.secagg import shamir
from privfer.secagg.shares import open_share
from privfer.secagg.config import SecAggConfig
from privfer.secagg.errors import (
    DuplicateSender,
    InconsistentShares,
    MalformedMessage,
    NotEnoughShares,
    OutOfRangeSum,
    RoundAborted,
    SecAggError,
    UnknownSender,
    WrongStage,
    WrongVectorLength,
)
from privfer.secagg.graph import graph_seed, neighbourhoods
from privfer.secagg.identity import RosterCertificate, verify_signature
from privfer.secagg.idsets import id_runs
from privfer.secagg.keys import (
    COMMITMENT_BYTES,
    PURPOSE_MASK,
    agree,
    check_public_key,
    commitment,
    public_of_private,
    seed_commitment,
)
from privfer.secagg.codec import SERVER
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
from privfer.secagg.prg import MaskExpander, word_dtype
from privfer.secagg.transcript import ServerSum, ServerTranscript, TranscriptEntry
from privfer.secagg.statements import (
    advertise_statement,
    cached_config_digest,
    cached_ids_digest,
    consistency_statement,
    deal_leaf,
    deal_statement,
    merkle_levels,
    merkle_path,
    roster_digest,
)


class SecAggServer:
    """The aggregator of one round.

    Every ``receive_*`` takes ``peer=``, a required keyword: the client the bytes arrived from, as the
    authenticated channel (TLS client certificate, Flower node id) says. A message signed as another sender
    is refused (``UnknownSender``). ``peer=None`` is an explicit statement that the transport cannot tell
    who sent the bytes; the message's own sender field is then trusted, and one client can speak for another.

    Under ``security = "active"`` the server takes the roster ``certificate`` (it refuses unenrolled or unsigned
    advertisements early, as an honest server should — the clients check everything again) and, when it knows
    it, the round's ``context`` digest (then it forwards only consistency signatures that verify). Its honesty
    is never relied on: the clients' checks are what the guarantee rests on.
    """

    def __init__(self, config: SecAggConfig, round_id: str, layout: PayloadLayout, *,
                 certificate: RosterCertificate | None = None, context: bytes | None = None) -> None:
        if config.security == "active" and certificate is None:
            raise ValueError("security 'active' needs the roster certificate on the server too (to refuse "
                             "unenrolled advertisements before the clients do)")
        self.certificate = certificate
        self.context = context
        self.config = config
        self.round_id = round_id
        self.layout = layout
        self.stage = "advertise"
        self.transcript = ServerTranscript()
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._public_keys: set[bytes] = set()  # every advertised public key, for the reuse check in O(1)
        self._neighbours: dict[int, frozenset[int]] = {}
        self._shares: dict[int, dict[int, bytes]] = {}  # sender -> receiver -> ciphertext
        self._commitments: dict[int, dict[int, bytes]] = {}  # dealer -> holder -> commitments to its two shares
        self._seed_commitments: dict[int, bytes] = {}  # dealer -> commitment to its self-mask seed b
        self.rejected: dict[int, set[int]] = {}  # dealer -> holders whose returned shares failed verification
        self._masked: dict[int, np.ndarray] = {}
        self._responses: dict[int, UnmaskResponse] = {}
        self._request: UnmaskRequest | None = None
        self._advert_signatures: dict[int, bytes] = {}
        self._consistency: dict[int, bytes] = {}  # survivor -> its signature on the round's statement
        self._roster_digest = b""
        self._deals: dict[int, tuple[bytes, list[list[bytes]], tuple[int, ...]]] = {}  # dealer -> signature, tree
        self.blamed: dict[int, set[int]] = {}  # dealer -> holders whose verified complaint excluded it
        self.false_complaints: dict[int, set[int]] = {}  # holder -> dealers it accused of a share that opens

    # -- plumbing ---------------------------------------------------------------
    def _accept(self, raw: bytes | Message, kind: type[Message], stage: str, peer: int | None) -> Message:
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            # an object is checked exactly as its bytes would be (constructors can be bypassed: model_construct)
            try:
                raw = raw.to_bytes()
            except Exception as exc:  # noqa: BLE001 - whatever a malformed object raises, it is malformed
                raise MalformedMessage(f"a {type(raw).__name__} that does not encode ({exc.__class__.__name__})"
                                       ) from None
        message = decode(raw)
        if not isinstance(message, kind):
            raise WrongStage(f"expected {kind.__name__}, got {type(message).__name__}")
        check_header(message, self.round_id)
        if message.sender == SERVER:
            raise UnknownSender("a client message claims to come from the server (sender 0)")
        if peer is not None and message.sender != peer:
            raise UnknownSender(f"the channel of client {peer} carried a message signed as client {message.sender}")
        if self.stage != stage:
            raise WrongStage(f"a {kind.__name__} arrived while the server is at stage {self.stage!r}")
        size = len(raw)
        self.transcript.entries.append(TranscriptEntry(stage, "in", message.sender, size, message))
        return message

    def _send(self, message: Message, stage: str, party: int) -> Message:
        self.transcript.entries.append(TranscriptEntry(stage, "out", party, len(message.to_bytes()), message))
        return message

    def _require(self, count: int, what: str) -> None:
        needed = self.config.group_threshold
        if count < needed:
            self.stage = "aborted"
            raise RoundAborted(f"only {count} clients {what}; the threshold is {needed}")

    # -- stage 0 -----------------------------------------------------------------
    def receive_advertise(self, raw: bytes | AdvertiseKeys, *, peer: int | None) -> None:
        message = self._accept(raw, AdvertiseKeys, "advertise", peer)
        if message.sender in self._keys:
            raise DuplicateSender(f"client {message.sender} advertised keys twice")
        if len(self._keys) >= self.config.num_clients:
            raise UnknownSender(f"more than num_clients={self.config.num_clients} clients advertised keys")
        seen = self._public_keys
        if message.c_public in seen or message.s_public in seen or message.c_public == message.s_public:
            raise DuplicateSender(f"client {message.sender} reuses a public key")
        for key in (message.c_public, message.s_public):
            check_public_key(key)
        if self.config.security == "active":
            assert self.certificate is not None
            verify_signature(self.certificate.public_key(message.sender),
                             advertise_statement(self.certificate.study, self.round_id, message.sender,
                                                 message.c_public, message.s_public),
                             message.signature, f"client {message.sender}'s key advertisement")
            self._advert_signatures[message.sender] = message.signature
        self._keys[message.sender] = (message.c_public, message.s_public)
        seen.update((message.c_public, message.s_public))

    def _close_advertise(self, roster: str) -> None:
        if self.stage != "advertise":
            raise WrongStage(f"the roster is sent once, after key advertisement (stage is {self.stage!r})")
        if self.config.roster != roster:
            raise WrongStage(f"the round's roster is {self.config.roster!r}, not {roster!r}")
        self._require(len(self._keys), "advertised keys")
        self.stage = "share"
        self._neighbours = neighbourhoods(self._keys, self.config.degree, graph_seed(self.round_id, self._keys))

    def key_roster(self) -> KeyRoster:
        """``roster = "full"``: every participant's keys, one broadcast (each client derives the graph)."""
        self._close_advertise("full")
        self._roster_digest = roster_digest(self._keys)
        return self._send(KeyRoster(round_id=self.round_id, sender=SERVER, keys=dict(self._keys),
                                    signatures=dict(self._advert_signatures)), "advertise", 0)

    def group_rosters(self) -> dict[int, GroupRoster]:
        """``roster = "group"``: one message per client with every advertised id as runs and its group's keys
        only (O(k + runs) bytes each)."""
        self._close_advertise("group")
        members = id_runs(self._keys)
        return {
            client: self._send(GroupRoster(round_id=self.round_id, sender=SERVER, receiver=client, members=members,
                                           keys={v: self._keys[v] for v in self._neighbours[client] | {client}},
                                           signatures={v: self._advert_signatures[v]
                                                       for v in self._neighbours[client] | {client}
                                                       if v in self._advert_signatures}),
                               "advertise", client)
            for client in sorted(self._keys)
        }

    # -- stage 1 -----------------------------------------------------------------
    def receive_share_keys(self, raw: bytes | ShareKeys, *, peer: int | None) -> None:
        message = self._accept(raw, ShareKeys, "share", peer)
        sender = message.sender
        if sender not in self._keys:
            raise UnknownSender(f"client {sender} did not advertise keys")
        if sender in self._shares:
            raise DuplicateSender(f"client {sender} shared keys twice")
        if set(message.ciphertexts) != set(self._neighbours[sender]):
            raise UnknownSender(f"client {sender} sent shares for other clients than its {len(self._neighbours[sender])} neighbours")
        if set(message.commitments) != set(self._neighbours[sender]) | {sender}:
            raise UnknownSender(f"client {sender} committed to shares for other clients than its group")
        if self.config.security == "active":  # the signed deal: what a holder's complaint is checked against
            assert self.certificate is not None
            holders = tuple(sorted(message.commitments))
            levels = merkle_levels([deal_leaf(h, message.ciphertexts.get(h, b""), message.commitments[h])
                                    for h in holders])
            verify_signature(self.certificate.public_key(sender),
                             deal_statement(self.certificate.study, self.round_id, sender, len(holders),
                                            levels[-1][0], self._roster_digest),
                             message.signature, f"client {sender}'s deal")
            self._deals[sender] = (message.signature, levels, holders)
        self._shares[sender] = dict(message.ciphertexts)
        self._commitments[sender] = dict(message.commitments)
        self._seed_commitments[sender] = message.seed_commitment

    def forward_shares(self) -> dict[int, ForwardedShares]:
        if self.stage != "share":
            raise WrongStage(f"shares are forwarded once, after ShareKeys (stage is {self.stage!r})")
        self._require(len(self._shares), "shared keys")
        self.stage = "masked"
        bundles: dict[int, ForwardedShares] = {}
        addressed: dict[int, dict[int, bytes]] = {receiver: {} for receiver in self._shares}
        for dealer in sorted(self._shares):  # one pass over every (dealer, receiver) pair: O(n k), not O(n^2)
            for receiver, blob in self._shares[dealer].items():
                if receiver in addressed:
                    addressed[receiver][dealer] = blob
        for receiver in sorted(self._shares):
            incoming = addressed[receiver]
            committed = {s: self._commitments[s][receiver] for s in incoming}
            proofs = {}
            for dealer in incoming if self._deals else ():
                signature, levels, holders = self._deals[dealer]
                proofs[dealer] = signature + b"".join(merkle_path(levels, bisect_left(holders, receiver)))
            bundles[receiver] = self._send(
                ForwardedShares(round_id=self.round_id, sender=SERVER, receiver=receiver, ciphertexts=incoming,
                                commitments=committed, proofs=proofs),
                "share", receiver,
            )
        return bundles

    # -- stage 2 -----------------------------------------------------------------
    def receive_masked_input(self, raw: bytes | MaskedInput, *, peer: int | None) -> None:
        message = self._accept(raw, MaskedInput, "masked", peer)
        if message.sender not in self._shares:
            raise UnknownSender(f"client {message.sender} did not share keys")
        if message.sender in self._masked:
            raise DuplicateSender(f"client {message.sender} sent a masked input twice")
        if message.modulus_bits != self.config.modulus_bits:
            raise WrongVectorLength(f"masked input in 2^{message.modulus_bits}, the round uses 2^{self.config.modulus_bits}")
        if message.vector.size != self.layout.length:
            raise WrongVectorLength(f"masked input of {message.vector.size} words, expected {self.layout.length}")
        if message.complaints:
            self._check_complaints(message.sender, message.complaints)
        self._masked[message.sender] = message.vector

    def _check_complaints(self, holder: int, complaints: dict[int, bytes]) -> None:
        """A holder revealed the share key of each dealer whose signed ciphertext it could not open. Check each
        accusation with that key: a ciphertext that opens and matches the dealer's commitments means the holder
        lied (recorded, ignored); otherwise the dealer cheated and is excluded — treated as dropped, its masks
        removed with its mask key, its input left out (SPEC 6.3)."""
        if self.config.security != "active":
            raise MalformedMessage("complaints are part of active security (signed deals) only")
        verdicts: dict[int, bool] = {}  # every complaint checked before any is recorded: a refused message blames no one
        for dealer, key in complaints.items():
            blob = self._shares.get(dealer, {}).get(holder)
            if blob is None or dealer == holder:
                raise UnknownSender(f"client {holder} complains about client {dealer}, who dealt it no share")
            try:
                open_share(key, blob, self.round_id, dealer, holder, self._roster_digest,
                           self._commitments[dealer].get(holder))
            except SecAggError:
                verdicts[dealer] = True
            else:
                verdicts[dealer] = False
        for dealer, guilty in verdicts.items():
            if guilty:
                self.blamed.setdefault(dealer, set()).add(holder)
            else:
                self.false_complaints.setdefault(holder, set()).add(dealer)

    def _close_masked(self, roster: str) -> UnmaskRequest:
        if self.stage != "masked":
            raise WrongStage(f"the unmask request is sent once, after MaskedInput (stage is {self.stage!r})")
        if self.config.roster != roster:
            raise WrongStage(f"the round's roster is {self.config.roster!r}, not {roster!r}")
        # a dealer whose signed share did not open is treated as dropped: its input is left out of the sum
        survivors = tuple(sorted(set(self._masked) - set(self.blamed)))
        needed = max(self.config.group_threshold, self.config.min_inputs or 0)
        if self.config.security == "active":
            assert self.certificate is not None
            needed = max(needed, self.config.consistency_threshold(
                len(self._keys), self.config.study_colluders(len(self.certificate.members))))
        if len(survivors) < needed:
            self.stage = "aborted"  # the clients would refuse to unmask (or to sign)
            if self.blamed:
                raise InconsistentShares(f"dealers {sorted(self.blamed)[:8]} dealt shares that do not open; "
                                         f"without them {len(survivors)} inputs remain, fewer than {needed}",
                                         senders=tuple(sorted(self.blamed)))
            self._require(len(survivors), "sent masked inputs")
            raise RoundAborted(f"only {len(survivors)} masked inputs arrived; the round needs at least {needed}")
        self.stage = "consistency" if self.config.security == "active" else "unmask"
        dropped = tuple(sorted(set(self._shares) - set(survivors)))
        self._request = UnmaskRequest(round_id=self.round_id, sender=SERVER, survivors=survivors, dropped=dropped)
        return self._request

    def unmask_request(self) -> UnmaskRequest:
        """``roster = "full"``: every survivor and dropped id, one broadcast."""
        return self._send(self._close_masked("full"), "masked", 0)

    def group_unmask_requests(self) -> dict[int, GroupUnmaskRequest]:
        """``roster = "group"``: one request per survivor with every survivor's id as runs (a few bytes when few
        dropped) and the dropped clients of its group (O(k))."""
        request = self._close_masked("group")
        survivors, dropped = id_runs(request.survivors), request.dropped_set
        out = {}
        for client in request.survivors:
            group = self._neighbours[client] | {client}
            out[client] = self._send(GroupUnmaskRequest(
                round_id=self.round_id, sender=SERVER, receiver=client, survivors=survivors,
                dropped=tuple(sorted(group & dropped))), "masked", client)
        return out

    # -- stage 3a (active security) ---------------------------------------------------
    def receive_consistency(self, raw: bytes | ConsistencySignature, *, peer: int | None) -> None:
        """A survivor's signature on its statement. With the round's ``context`` known, a signature that does not
        verify on the statement this server sent is refused (``InvalidSignature``) and never forwarded."""
        message = self._accept(raw, ConsistencySignature, "consistency", peer)
        assert self._request is not None
        if not self._request.survived(message.sender):
            raise UnknownSender(f"client {message.sender} is not a survivor; only survivors sign the round")
        if message.sender in self._consistency:
            raise DuplicateSender(f"client {message.sender} signed the round twice")
        if self.context is not None:
            assert self.certificate is not None
            statement = consistency_statement(self.certificate.study, self.round_id, self._roster_digest,
                                              cached_ids_digest(self._request.survivors), self.context,
                                              cached_config_digest(self.config))
            verify_signature(self.certificate.public_key(message.sender), statement, message.signature,
                             f"client {message.sender}'s consistency signature")
        self._consistency[message.sender] = message.signature

    def signature_list(self) -> SignatureList:
        """Every survivor's consistency signature, one broadcast; the round aborts if a survivor did not sign (the
        clients would refuse to unmask: SPEC 5.2)."""
        if self.stage != "consistency":
            raise WrongStage(f"the signatures are sent once, after the consistency check (stage is {self.stage!r})")
        assert self._request is not None
        unsigned = sorted(set(self._request.survivors) - set(self._consistency))
        if unsigned:
            self.stage = "aborted"
            raise RoundAborted(f"survivors {unsigned[:8]} did not sign the round ({len(self._consistency)} of "
                               f"{self._request.included} did); every survivor must, so nothing is released")
        self.stage = "unmask"
        return self._send(SignatureList(round_id=self.round_id, sender=SERVER, signatures=dict(self._consistency)),
                          "consistency", 0)

    # -- stage 3 -----------------------------------------------------------------
    def receive_unmask(self, raw: bytes | UnmaskResponse, *, peer: int | None) -> None:
        message = self._accept(raw, UnmaskResponse, "unmask", peer)
        assert self._request is not None
        if message.sender not in self._masked:
            raise UnknownSender(f"client {message.sender} is not a survivor")
        if message.sender in self._responses:
            raise DuplicateSender(f"client {message.sender} answered the unmask request twice")
        group = self._neighbours[message.sender] | {message.sender}
        if not set(message.seed_shares) <= self._request.survivor_set & group:
            raise UnknownSender(f"client {message.sender} sent seed shares of clients that are not surviving neighbours")
        if not set(message.key_shares) <= self._request.dropped_set & group:
            raise UnknownSender(f"client {message.sender} sent key shares of clients that are not dropped neighbours")
        self._responses[message.sender] = message

    def _reconstruct(self, owner: int, table: str) -> bytes:
        """``owner``'s secret from verified shares: every returned share is checked against the commitment its
        dealer made in ShareKeys (a share that fails is set aside and its holder named), the secret is rebuilt
        from t verified shares and checked against its own commitment (b) or advertised public key (s)."""
        seed = table == "seed_shares"
        what = "self-mask seed" if seed else "mask key"
        threshold = self.config.group_threshold
        # only the owner's group holds its shares: look there, not through every response (O(k), not O(n))
        holders = [r for r in sorted(self._neighbours[owner] | {owner})
                   if r in self._responses and owner in getattr(self._responses[r], table)]
        verified, rejected = [], []
        for holder in holders:
            raw = getattr(self._responses[holder], table)[owner]
            pair = self._commitments[owner][holder]
            expected = pair[:COMMITMENT_BYTES] if seed else pair[COMMITMENT_BYTES:]
            kind = b"seed-share" if seed else b"key-share"
            if hmac.compare_digest(expected, commitment(kind, self.round_id, owner, holder, raw)):
                verified.append(holder)
            else:
                rejected.append(holder)
        if rejected:
            self.rejected.setdefault(owner, set()).update(rejected)
        if len(verified) < threshold:
            self.stage = "aborted"
            if rejected:
                raise InconsistentShares(
                    f"the shares of client {owner}'s {what} returned by clients {rejected[:8]} do not match the "
                    f"commitments client {owner} made; {len(verified)} verified shares remain, the threshold is "
                    f"{threshold}", senders=tuple(rejected))
            raise RoundAborted(f"only {len(verified)} shares of client {owner}'s {what} arrived; the threshold is "
                               f"{threshold}")
        chosen = verified[:threshold]
        shares = np.stack([shamir.share_from_bytes(getattr(self._responses[h], table)[owner]) for h in chosen])
        key = tuple(chosen)
        weights = self._lagrange.get(key)
        if weights is None:
            weights = self._lagrange[key] = shamir.lagrange_at_zero(chosen)
        chunks = (shares * weights[:, None] % np.uint64(shamir.PRIME)).sum(axis=0) % np.uint64(shamir.PRIME)
        try:
            secret = shamir.chunks_to_secret(chunks)
        except (NotEnoughShares, ValueError):  # verified shares on a polynomial whose secret is not 256 bits
            self.stage = "aborted"
            raise InconsistentShares(f"client {owner} dealt shares of its {what} that reconstruct no valid secret",
                                     senders=(owner,)) from None
        if seed:
            consistent = hmac.compare_digest(self._seed_commitments[owner], seed_commitment(self.round_id, owner, secret))
        else:
            consistent = hmac.compare_digest(public_of_private(secret), self._keys[owner][1])
        if not consistent:  # every share matches its commitment, yet they do not lie on one polynomial of degree < t
            self.stage = "aborted"
            raise InconsistentShares(f"client {owner} dealt shares of its {what} that reconstruct another secret "
                                     "than the one it committed to", senders=(owner,))
        return secret

    def finish(self) -> ServerSum:
        """Remove every mask and return the survivors' sum."""
        if self.stage != "unmask":
            raise WrongStage(f"the round finishes once, after Unmask (stage is {self.stage!r})")
        self._require(len(self._responses), "answered the unmask request")
        assert self._request is not None
        self._lagrange: dict[tuple[int, ...], np.ndarray] = {}
        bits, length = self.config.modulus_bits, self.layout.length
        total = np.zeros(length, dtype=word_dtype(bits))
        for survivor in self._request.survivors:  # a blamed dealer's masked input is not summed
            total += self._masked[survivor]
        expander = MaskExpander(length, bits)
        for survivor in self._request.survivors:
            total -= expander.expand(self._reconstruct(survivor, "seed_shares"))
        survivors = set(self._request.survivors)
        for gone in self._request.dropped:
            mask_key = self._reconstruct(gone, "key_shares")
            for peer in sorted(self._neighbours[gone] & survivors):
                seed = agree(mask_key, self._keys[peer][1], PURPOSE_MASK, self.round_id, peer, gone)
                mask = expander.expand(seed)
                if peer < gone:  # the peer added +mask; take it out
                    total -= mask
                else:
                    total += mask
        included = tuple(sorted(survivors))
        try:
            self.layout.check_sum(total, len(included))
        except OutOfRangeSum:
            self.stage = "aborted"
            raise
        self.stage = "done"
        return ServerSum(words=total, included=included, decoded=self.layout.decode(total),
                         blamed={d: tuple(sorted(h)) for d, h in self.blamed.items()},
                         false_complaints={h: tuple(sorted(d)) for h, d in self.false_complaints.items()})

    def stats(self) -> dict[str, Any]:
        return {
            "advertised": len(self._keys),
            "shared": len(self._shares),
            "masked": len(self._masked),
            "signed": len(self._consistency),
            "responded": len(self._responses),
        }
