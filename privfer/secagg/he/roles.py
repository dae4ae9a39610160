"""The roles: the key authority (the only secret key; verifies, sums and decrypts one sum per round), the clients
and the server (public context only), and the checks on untrusted ciphertext framing."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from privfer.secagg.errors import (DuplicateSender, MalformedMessage, MessageError, OutOfRangeSum, RoundAborted,
                                   UnknownSender, WrongRound, WrongVectorLength)
from privfer.secagg.he.config import MAX_CIPHERTEXT_BYTES, CKKSConfig, InvalidCiphertext, _load_context, _tenseal
from privfer.secagg.he.packing import HELayout
from privfer.secagg.he.wire import (_SEAL_HEADER, _SEAL_INFO, HEMessage, _seal_key, _unpack_chunks, seal_update,
                                    update_statement)
from privfer.secagg.identity import Enrollment, RosterCertificate, verify_signature
from privfer.secagg.quantize import ClippingReport


def _varint(raw: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= len(raw) or shift > 63:
            raise InvalidCiphertext("a CKKS vector's framing is truncated")
        byte = raw[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def check_vector_framing(raw: bytes, who: str) -> None:
    """Refuse, before TenSEAL loads it, a serialized CKKSVector that holds anything but ONE ciphertext (TenSEAL's
    CKKSVectorProto: sizes = 1, ciphertexts = 2, scale = 3). A vector may carry any number of compressed
    ciphertexts, each tiny on the wire and megabytes once loaded: one enrolled client could otherwise exhaust
    the key authority's memory with a small update (hostile review 4). One SEAL ciphertext is bounded (at most
    16 polynomials)."""
    at, ciphertexts = 0, 0
    while at < len(raw):
        tag, at = _varint(raw, at)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, at = _varint(raw, at)
        elif wire == 1:
            at += 8
        elif wire == 2:
            length, at = _varint(raw, at)
            at += length
            ciphertexts += field == 2
        elif wire == 5:
            at += 4
        else:
            raise InvalidCiphertext(f"{who} sent a CKKS vector with an unknown field encoding")
        if at > len(raw):
            raise InvalidCiphertext(f"{who} sent a truncated CKKS vector")
        if field not in (1, 2, 3):
            raise InvalidCiphertext(f"{who} sent a CKKS vector with an unknown field {field}")
    if ciphertexts != 1:
        raise InvalidCiphertext(f"{who} sent a CKKS vector carrying {ciphertexts} ciphertexts, not one")


def parse_chunks(context, blobs: Sequence[bytes], layout: "HELayout", who: str) -> list:
    """CKKS vectors from bytes, each checked for the agreed number of values (InvalidCiphertext otherwise)."""
    ts = _tenseal()
    if len(blobs) != layout.chunks:
        raise WrongVectorLength(f"{who}: {len(blobs)} ciphertext chunks, expected {layout.chunks}")
    slots = layout.config.slots
    vectors = []
    for index, blob in enumerate(blobs):
        check_vector_framing(blob, who)
        try:
            vector = ts.ckks_vector_from(context, blob)
        except Exception:  # TenSEAL raises ValueError or RuntimeError on bad bytes
            raise InvalidCiphertext(f"{who} sent bytes that are not a CKKS vector") from None
        expected = min(slots, layout.length - index * slots)
        if vector.size() != expected:
            raise InvalidCiphertext(f"{who}: chunk {index} holds {vector.size()} values, expected {expected}")
        vectors.append(vector)
    return vectors


def add_into(total: list, chunks: list) -> bool:
    """Add one client's chunks to ``total`` in place; if a chunk does not add (another scale, say), take back the
    ones already added and return False: nothing of that client stays in the sum."""
    added = []
    try:
        for chunk_sum, vector in zip(total, chunks):
            chunk_sum += vector
            added.append((chunk_sum, vector))
    except (ValueError, RuntimeError):
        for chunk_sum, vector in added:
            chunk_sum -= vector
        return False
    return True


def add_updates(vectors: list[list], who: Sequence[int]) -> list:
    """The chunk-wise sum of several clients' CKKS vectors, or InvalidCiphertext naming the client whose chunks
    do not add. The key authority sums the opened updates this way; anyone holding them computes the same sum."""
    total = [vector.copy() for vector in vectors[0]]
    for sender, chunks in zip(who[1:], vectors[1:]):
        if not add_into(total, chunks):
            raise InvalidCiphertext(f"client {sender}'s ciphertexts do not add to the others'")
    return total


class KeyAuthority:
    """Creates the CKKS keys, keeps the secret key, and decrypts one verified sum per round.

    ``certificate``: the study's roster certificate (checked by the caller against its pinned authority key): the
    key authority decrypts only sums of updates it verified — each signed by an enrolled member for this round,
    distinct members, at least ``min_clients`` — and sums them itself, so a server cannot add ciphertexts of its
    own (pads), duplicate one, or bring one from another round."""

    def __init__(self, config: CKKSConfig, certificate: RosterCertificate) -> None:
        if not isinstance(certificate, RosterCertificate):
            raise TypeError("the key authority needs the study's RosterCertificate to verify signed updates")
        ts = _tenseal()
        self.config = config
        self.certificate = certificate
        self._context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=config.poly_modulus_degree,
            coeff_mod_bit_sizes=list(config.coeff_mod_bit_sizes),
        )
        self._context.global_scale = 2.0**config.scale_bits
        public = self._context.copy()
        public.make_context_public()  # drops the secret key
        self._public = public.serialize(save_secret_key=False)
        self._released: set[str] = set()  # rounds whose decryption was attempted: one attempt per round id
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self._seal = X25519PrivateKey.generate()  # clients seal their updates to it (OS CSPRNG)
        self.rejected: set[int] = set()  # the last decryption's senders whose sealed update was bad

    @property
    def sealing_key(self) -> bytes:
        """The X25519 public key clients seal their updates to. Clients must get it from the key authority, not
        through the server (which could substitute its own and open every update)."""
        from privfer.secagg.keys import public_bytes

        return public_bytes(self._seal.public_key())

    def _unseal(self, update: HEMessage, layout: "HELayout") -> tuple[bytes, ...]:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(update.ciphertexts) != 1 or len(update.ciphertexts[0]) < _SEAL_HEADER + 16:
            raise InvalidCiphertext(f"client {update.sender}'s update is not one sealed blob")
        blob = update.ciphertexts[0]
        try:
            shared = self._seal.exchange(X25519PublicKey.from_public_bytes(blob[:32]))
            aad = _SEAL_INFO + update.round_id.encode("utf-8") + struct.pack(">I", update.sender)
            plain = AESGCM(_seal_key(shared, update.round_id, update.sender)).decrypt(
                blob[32:_SEAL_HEADER], blob[_SEAL_HEADER:], aad)
        except (InvalidTag, ValueError):
            raise InvalidCiphertext(f"client {update.sender}'s sealed update does not open") from None
        return _unpack_chunks(plain, layout.chunks)

    def public_context(self) -> bytes:
        """The context clients and the server get: public key only."""
        return self._public

    def signed_senders(self, bundle: HEMessage, round_id: str) -> list[int]:
        """Every update of the bundle, checked without decrypting anything: this round, distinct enrolled senders,
        a valid signature each. Any failure refuses the whole bundle (an honest server forwards only verified
        updates) and, deciding nothing about the plaintexts, leaves the round id open."""
        senders: list[int] = []
        if len(bundle.updates) > self.config.num_clients:
            raise RoundAborted(f"the bundle carries {len(bundle.updates)} updates; the round is for at most "
                               f"{self.config.num_clients} (the decryption error bound is sized for them)")
        for raw in bundle.updates:
            update = HEMessage.from_bytes(raw)
            if update.kind != "update":
                raise MalformedMessage("a bundle carries client updates only")
            if update.round_id != round_id:
                raise WrongRound(f"an update of round {update.round_id!r} in the bundle of round {round_id!r}")
            if update.sender in senders:
                raise DuplicateSender(f"the bundle carries client {update.sender}'s update twice")
            verify_signature(self.certificate.public_key(update.sender),
                             update_statement(self.certificate.study, round_id, update.sender, update.ciphertexts),
                             update.signature, f"client {update.sender}'s encrypted update")
            senders.append(update.sender)
        if tuple(sorted(senders)) != tuple(sorted(bundle.included)):
            raise MalformedMessage("the bundle's list of included clients is not the senders of its updates")
        return senders

    def opened_updates(self, bundle: HEMessage, senders: list[int], layout: "HELayout") -> tuple[list[int], list]:
        """Each signed update opened, parsed and added to the sum: one whose content is bad (the server could not
        see it) — not sealed to this authority, not CKKS, other chunks, another scale — is left out whole
        (``rejected``) and the others are summed."""
        total: list | None = None
        kept: list[int] = []
        for raw, sender in zip(bundle.updates, senders):
            try:
                chunks = parse_chunks(self._context, self._unseal(HEMessage.from_bytes(raw), layout), layout,
                                      f"client {sender}")
            except MessageError:
                self.rejected.add(sender)
                continue
            if total is None:
                total = chunks
            elif not add_into(total, chunks):
                self.rejected.add(sender)
                continue
            kept.append(sender)
        return kept, total or []

    def decrypt(self, message: HEMessage | bytes, layout: HELayout, round_id: str) -> "HEPlainSum":
        message = HEMessage.from_bytes(message) if isinstance(message, (bytes, bytearray)) else message
        if message.kind != "bundle":
            raise MalformedMessage("the key authority decrypts bundles of signed updates only")
        if message.round_id != round_id:
            raise WrongRound(f"bundle of round {message.round_id!r} in round {round_id!r}")
        if len(message.updates) < self.config.min_clients:
            raise RoundAborted(
                f"the bundle carries {len(message.updates)} updates; the key authority decrypts only sums of at "
                f"least {self.config.min_clients} enrolled clients"
            )
        if round_id in self._released:
            raise RoundAborted(
                f"round {round_id!r} was already decrypted (or its decryption refused); a second aggregate of the "
                "same round could be subtracted from the first, and repeated refusals would tell the noise"
            )
        signed = self.signed_senders(message, round_id)
        self._released.add(round_id)  # from here on plaintexts decide: one attempt per round id, whatever it gives
        self.rejected = set()
        senders, summed = self.opened_updates(message, signed, layout)
        if len(senders) < self.config.min_clients:
            raise RoundAborted(f"{len(senders)} updates opened; the key authority decrypts only sums of at least "
                               f"{self.config.min_clients}")
        values = [np.asarray(vector.decrypt(), dtype=np.float64) for vector in summed]
        noisy = np.concatenate(values)[: layout.length]
        # Release only the grid point: every client's values are on the grid, so their sum is, and the
        # decryption error (below a quarter step by the config's check) is rounded away. What leaves the key
        # authority is then a function of the true sum alone — not the (ciphertext, decryption) pairs of Li and
        # Micciancio's key-recovery attack.
        scale = 2.0**self.config.grid
        grid_points = np.rint(noisy * scale)
        error = float(np.max(np.abs(noisy * scale - grid_points))) / scale if noisy.size else 0.0
        flat = grid_points / scale
        arrays, count, clients, clipped, metrics = layout.unpack(flat)
        try:
            layout.check_sum(flat, len(senders))
            refused = error > self.config.error_bound(len(senders)) or round(clients) != len(senders)
        except OutOfRangeSum:
            refused = True
        if refused:
            # One refusal for every reason a decrypted sum is withheld (a decryption error beyond the bound, a false
            # client count, values out of range), and no number in it: which check failed, or by how much, would
            # be an oracle on the CKKS noise for whoever crafted the inputs (hostile review 4).
            raise OutOfRangeSum("the decrypted sum is refused: the decryption error, the encrypted client count or "
                                "a value is out of its bounds; nothing is released")
        return HEPlainSum(arrays, tuple(sorted(senders)), int(round(count)), clipped, metrics)


@dataclass
class HEPlainSum:
    arrays: list[np.ndarray]
    included: tuple[int, ...]
    example_count: int
    clipped: int
    metrics: dict[str, float]


class HEClient:
    """Encrypts one client's update with the public context (it cannot decrypt), seals it to the key authority
    and signs it as its member. ``sealing_key``: :attr:`KeyAuthority.sealing_key`, from the key authority (a
    trusted channel), never from the server."""

    def __init__(self, client_id: int, public_context: bytes, layout: HELayout, round_id: str,
                 enrollment: Enrollment, sealing_key: bytes) -> None:
        if not isinstance(enrollment, Enrollment) or enrollment.member != client_id:
            raise ValueError(f"client {client_id} needs its enrollment (member {client_id}'s identity and the "
                             "roster certificate) to sign its update")
        if not isinstance(sealing_key, (bytes, bytearray)) or len(sealing_key) != 32:
            raise ValueError("the key authority's sealing key is a 32-byte X25519 public key")
        self.client_id = client_id
        self.enrollment = enrollment
        self.sealing_key = bytes(sealing_key)
        self.context = _load_context(public_context)
        if self.context.has_secret_key():
            raise ValueError("clients must be given the public context, not the secret key")
        self.layout = layout
        self.round_id = round_id
        self.clipping = ClippingReport()

    def encrypt(self, update: Sequence[np.ndarray], example_count: int = 1,
                metrics: Mapping[str, float] | None = None) -> HEMessage:
        ts = _tenseal()
        chunks, self.clipping = self.layout.pack(update, example_count, metrics)
        blobs = [ts.ckks_vector(self.context, chunk.tolist()).serialize() for chunk in chunks]
        sealed = (seal_update(self.sealing_key, self.round_id, self.client_id, blobs),)
        signature = self.enrollment.identity.sign(
            update_statement(self.enrollment.study, self.round_id, self.client_id, sealed))
        return HEMessage(kind="update", round_id=self.round_id, sender=self.client_id, ciphertexts=sealed,
                         signature=signature)


class HEServer:
    """Checks signed, sealed updates and forwards them, as sent, to the key authority, which opens, verifies and
    sums them itself: the server never holds a ciphertext it could compute on, and its sum would be its word."""

    def __init__(self, public_context: bytes, layout: HELayout, round_id: str, config: CKKSConfig,
                 certificate: RosterCertificate | None = None) -> None:
        self.context = _load_context(public_context)
        if self.context.has_secret_key():
            raise ValueError("the server must be given the public context, not the secret key")
        self.layout = layout
        self.round_id = round_id
        self.config = config
        self.certificate = certificate
        self._updates: dict[int, bytes] = {}
        self.bytes_in: dict[int, int] = {}

    def receive(self, raw: bytes | HEMessage) -> None:
        message = HEMessage.from_bytes(raw) if isinstance(raw, (bytes, bytearray)) else raw
        raw = message.to_bytes()
        if message.kind != "update":
            raise MalformedMessage("the server accepts encrypted updates only")
        if message.round_id != self.round_id:
            raise WrongRound(f"update of round {message.round_id!r} in round {self.round_id!r}")
        if message.sender in self._updates:
            raise DuplicateSender(f"client {message.sender} sent two updates")
        if not 1 <= message.sender:
            raise UnknownSender("updates come from clients (ids >= 1)")
        if len(self._updates) >= self.config.num_clients:
            raise UnknownSender(f"more than num_clients={self.config.num_clients} updates")
        limit = _SEAL_HEADER + 16 + 4 + self.layout.chunks * (4 + MAX_CIPHERTEXT_BYTES)
        if len(message.ciphertexts) != 1 or len(message.ciphertexts[0]) > limit:
            raise WrongVectorLength(f"client {message.sender}'s update is not one sealed blob of at most the "
                                    f"round's {self.layout.chunks} chunks")
        if self.certificate is not None:  # an honest server refuses what the key authority would
            verify_signature(self.certificate.public_key(message.sender),
                             update_statement(self.certificate.study, self.round_id, message.sender,
                                              message.ciphertexts),
                             message.signature, f"client {message.sender}'s encrypted update")
        self._updates[message.sender] = raw
        self.bytes_in[message.sender] = len(raw)

    def bundle(self) -> HEMessage:
        """Every received update, as sent, for the key authority."""
        if not self._updates:
            raise RoundAborted("no encrypted update arrived")
        included = tuple(sorted(self._updates))
        return HEMessage(kind="bundle", round_id=self.round_id, sender=0, included=included,
                         updates=tuple(self._updates[c] for c in included))
