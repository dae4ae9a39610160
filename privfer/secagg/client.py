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

import struct
import time
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np

from privfer.secagg import shamir
from privfer.secagg.config import SecAggConfig
from privfer.secagg.errors import (
    MalformedMessage,
    RoundAborted,
    UnknownSender,
    UnsafeUnmaskRequest,
    WrongRound,
    WrongStage,
)
from privfer.secagg.graph import graph_seed, neighbourhoods
from privfer.secagg.keys import PURPOSE_MASK, PURPOSE_SHARE, KeyPairs, agree, decrypt_share, encrypt_share
from privfer.secagg.messages import (
    SERVER,
    AdvertiseKeys,
    ForwardedShares,
    KeyRoster,
    MaskedInput,
    Message,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from privfer.secagg.payload import PayloadLayout
from privfer.secagg.prg import SEED_BYTES, MaskExpander
from privfer.secagg.quantize import ClippingReport
from privfer.secagg.randomness import SYSTEM, Randomness

_STAGES = ("new", "advertised", "shared", "masked", "unmasked")
_PLAINTEXT = struct.Struct(">II")


def share_plaintext(sender: int, receiver: int, seed_share: np.ndarray, key_share: np.ndarray) -> bytes:
    return _PLAINTEXT.pack(sender, receiver) + shamir.share_to_bytes(seed_share) + shamir.share_to_bytes(key_share)


def parse_share_plaintext(raw: bytes) -> tuple[int, int, np.ndarray, np.ndarray]:
    if len(raw) != _PLAINTEXT.size + 2 * shamir.SHARE_BYTES:
        raise MalformedMessage("decrypted share bundle has the wrong length")
    sender, receiver = _PLAINTEXT.unpack_from(raw)
    body = raw[_PLAINTEXT.size :]
    return (sender, receiver, shamir.share_from_bytes(body[: shamir.SHARE_BYTES]),
            shamir.share_from_bytes(body[shamir.SHARE_BYTES :]))


def check_header(message: Message, round_id: str, sender: int | None = None) -> None:
    if message.round_id != round_id:
        raise WrongRound(f"message of round {message.round_id!r} in round {round_id!r}")
    if sender is not None and message.sender != sender:
        raise UnknownSender(f"expected a message from {sender}, got one from {message.sender}")


class SecAggClient:
    """One participant of one secure-aggregation round."""

    def __init__(
        self,
        client_id: int,
        config: SecAggConfig,
        round_id: str,
        layout: PayloadLayout,
        randomness: Randomness = SYSTEM,
    ) -> None:
        if not 1 <= client_id <= shamir.PRIME - 1:
            raise ValueError(f"client ids must be in 1..{shamir.PRIME - 1}, got {client_id}")
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
        self._peers: frozenset[int] = frozenset()  # neighbours whose shares arrived
        self._held: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # owner -> (seed share, key share)
        self._self_seed = b""
        self.mask_seconds = 0.0  # PRG expansion + modular addition of all masks (benchmarks compare it with the cipher)

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
            raise

    # -- stage 0 ---------------------------------------------------------------
    def advertise_keys(self) -> AdvertiseKeys:
        self._advance("new", "advertised")
        self._keys = KeyPairs.generate(self.randomness)
        return AdvertiseKeys(
            round_id=self.round_id, sender=self.client_id, c_public=self._keys.c_public, s_public=self._keys.s_public
        )

    # -- stage 1 ---------------------------------------------------------------
    def share_keys(self, roster: KeyRoster) -> ShareKeys:
        check_header(roster, self.round_id, SERVER)
        self._advance("advertised", "shared")
        with self._or_abort():
            assert self._keys is not None
            mine = roster.keys.get(self.client_id)
            if mine != (self._keys.c_public, self._keys.s_public):
                raise UnknownSender(f"the roster does not list client {self.client_id} with its own keys")
            self._roster = dict(roster.keys)
            neighbours = neighbourhoods(list(roster.keys), self.config.degree, graph_seed(self.round_id, roster.keys))
            self._group = neighbours[self.client_id] | {self.client_id}
            threshold = self.config.group_threshold
            if len(self._group) < threshold:
                self.stage = "aborted"
                raise RoundAborted(f"client {self.client_id} has {len(self._group)} group members, the threshold is {threshold}")

            self._self_seed = self.randomness.bytes(SEED_BYTES)
            holders = sorted(self._group)
            shares = shamir.split([self._self_seed, self._keys.s_secret()], holders, threshold, self.randomness)
            ciphertexts: dict[int, bytes] = {}
            for index, holder in enumerate(holders):
                seed_share, key_share = shares[index, 0], shares[index, 1]
                if holder == self.client_id:
                    self._held[holder] = (seed_share, key_share)  # our own share never leaves the client
                    continue
                key = agree(self._keys.c_private, self._roster[holder][0], PURPOSE_SHARE, self.round_id,
                            self.client_id, holder)
                plaintext = share_plaintext(self.client_id, holder, seed_share, key_share)
                ciphertexts[holder] = encrypt_share(key, plaintext, self.round_id, self.client_id, holder, self.randomness)
            return ShareKeys(round_id=self.round_id, sender=self.client_id, ciphertexts=ciphertexts)

    # -- stage 2 ---------------------------------------------------------------
    def masked_input(
        self,
        forwarded: ForwardedShares,
        update: Sequence[np.ndarray],
        example_count: int = 1,
        metrics: Mapping[str, float] | None = None,
    ) -> MaskedInput:
        check_header(forwarded, self.round_id, SERVER)
        if forwarded.receiver != self.client_id:
            raise UnknownSender(f"shares addressed to {forwarded.receiver} were delivered to {self.client_id}")
        self._advance("shared", "masked")
        with self._or_abort():
            assert self._keys is not None
            strangers = set(forwarded.ciphertexts) - set(self._group)
            if strangers:
                raise UnknownSender(f"shares from clients outside this client's group: {sorted(strangers)[:5]}")
            for sender, blob in forwarded.ciphertexts.items():
                key = agree(self._keys.c_private, self._roster[sender][0], PURPOSE_SHARE, self.round_id,
                            sender, self.client_id)
                plaintext = decrypt_share(key, blob, self.round_id, sender, self.client_id)
                inner_sender, inner_receiver, seed_share, key_share = parse_share_plaintext(plaintext)
                if (inner_sender, inner_receiver) != (sender, self.client_id):
                    raise UnknownSender("a share bundle names other clients than the envelope")
                self._held[sender] = (seed_share, key_share)
            self._peers = frozenset(forwarded.ciphertexts)
            if len(self._peers) + 1 < self.config.group_threshold:
                self.stage = "aborted"
                raise RoundAborted(
                    f"client {self.client_id}: only {len(self._peers) + 1} of its group shared keys, "
                    f"the threshold is {self.config.group_threshold}"
                )

            words, report = self.layout.encode(update, example_count, metrics, self.randomness)
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
            return MaskedInput(round_id=self.round_id, sender=self.client_id, modulus_bits=bits, vector=masked)

    # -- stage 3 ---------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        check_header(request, self.round_id, SERVER)
        # Answer at most once per round: a second request could ask for the other share of a peer.
        self._advance("masked", "unmasked")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise UnsafeUnmaskRequest(
                f"clients {sorted(survivors & dropped)[:5]} are listed as both survived and dropped; "
                "answering would reveal both their self mask and their pairwise masks"
            )
        if self.client_id in dropped or self.client_id not in survivors:
            raise UnsafeUnmaskRequest(f"client {self.client_id} sent its masked input but is not listed as a survivor")
        known = set(self._peers) | {self.client_id}
        alive = survivors & known
        if len(alive) < self.config.group_threshold:
            raise RoundAborted(
                f"client {self.client_id}: {len(alive)} of its group survived, the threshold is "
                f"{self.config.group_threshold}"
            )
        seed_shares = {v: shamir.share_to_bytes(self._held[v][0]) for v in sorted(alive)}
        key_shares = {v: shamir.share_to_bytes(self._held[v][1]) for v in sorted(dropped & known)}
        return UnmaskResponse(round_id=self.round_id, sender=self.client_id, seed_shares=seed_shares,
                              key_shares=key_shares)
