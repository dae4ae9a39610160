"""Identities the server cannot mint: members' Ed25519 keys and the enrollment authority's roster certificate.

Under ``security = "active"`` (Bonawitz et al., CCS 2017, the active variant)
a round's participants are the members an **enrollment authority** — a study's
organiser, a teacher, an ethics board; never the aggregation server — listed
in a signed :class:`RosterCertificate`: the study id, a validity period, and
every member's id with its long-term Ed25519 public key. Clients pin the
authority's public key; a roster entry, a key advertisement or a consistency
signature that the certificate does not back is refused
(:class:`~privfer.secagg.errors.UnenrolledClient`,
:class:`~privfer.secagg.errors.InvalidSignature`), so the server can neither
invent clients (sybils) nor substitute its own keys for a member's.

What must still be trusted: the authority enrolls real, distinct people and
keeps its key; a member keeps its private key (written 0600, never printed or
logged). protocols/secagg/SPEC.md section 3.8 gives the byte layouts.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import struct
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privfer.secagg.errors import InvalidCertificate, InvalidSignature, UnenrolledClient, WrongRound
from privfer.secagg.reader import ByteReader

PUBLIC_BYTES = 32
SIGNATURE_BYTES = 64
MAX_MEMBERS = 1_000_000
MAX_MEMBER_ID = (1 << 31) - 2  # member ids are the protocol's client ids (Shamir points 1..p-1)
CERT_MAGIC = b"PFRC"
CERT_VERSION = 1
PUBLIC_PREFIX = "privfer-ed25519 "


def _study_bytes(study: str) -> bytes:
    encoded = study.encode("utf-8")
    if not 1 <= len(encoded) <= 255:
        raise ValueError("a study id is 1 to 255 bytes of UTF-8")
    return bytes([len(encoded)]) + encoded


@lru_cache(maxsize=1 << 17)
def _verifies(public: bytes, message: bytes, signature: bytes) -> bool:
    """Ed25519 verification, cached by value: the clients of an in-process round verify each distinct signature
    once, not once each (a pure function of its arguments, so the cache cannot change an answer)."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (_CryptoInvalidSignature, ValueError):
        return False
    return True


def verify_signature(public: bytes, message: bytes, signature: bytes, what: str) -> None:
    """Raise :class:`InvalidSignature` (naming ``what``) unless ``signature`` is ``public``'s on ``message``."""
    if len(public) != PUBLIC_BYTES or len(signature) != SIGNATURE_BYTES \
            or not _verifies(bytes(public), bytes(message), bytes(signature)):
        raise InvalidSignature(f"{what}: the signature does not verify")


def fingerprint(public: bytes) -> str:
    """A short, printable name of a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public).hexdigest()[:16]


class Identity:
    """A long-term Ed25519 signing key (a member's, or the enrollment authority's)."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())  # OS CSPRNG inside OpenSSL

    @classmethod
    def from_seed(cls, seed: bytes) -> "Identity":
        """A key from 32 given bytes: for known-answer vectors and keyed derivations only."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    def __repr__(self) -> str:  # never the private key
        return f"Identity(public={self.fingerprint})"

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the private key (PKCS#8 PEM) readable by its owner only (0600), and the public key beside it as
        ``<path>.pub``; returns the public key's path. Each file appears whole or not at all (written to a
        temporary file, then linked into place), and an existing key is never replaced unless ``overwrite``."""
        path = Path(path)
        pem = self._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; an identity key is never overwritten silently")
        _write_whole(path, pem, 0o600, overwrite)
        public_path = path.with_name(path.name + ".pub")
        _write_whole(public_path, public_line(self.public).encode("ascii"), 0o644, True)
        return public_path

    @classmethod
    def load(cls, path: str | Path) -> "Identity":
        """Read a private key written by :meth:`save`; refuses one that others can read (like ssh does)."""
        path = Path(path)
        try:
            mode = path.stat().st_mode
            raw = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read identity key {path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(f"identity key {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                             f"chmod 600 {path}")
        try:
            key = serialization.load_pem_private_key(raw, password=None)
        except (ValueError, TypeError):
            raise ValueError(f"{path} is not an unencrypted PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)


def _write_whole(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """``data`` to ``path`` with ``mode`` from the start (never briefly readable by others), fsynced, then moved
    into place: replaced when ``overwrite``, else linked (FileExistsError if ``path`` appeared meanwhile)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; an identity key is never overwritten silently") from None
    finally:
        if temporary.exists():
            temporary.unlink()


def write_certificate(path: str | Path, certificate: "RosterCertificate", *, overwrite: bool = False) -> None:
    """The certificate's bytes to ``path``, whole or not at all."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite to replace a roster certificate")
    _write_whole(path, certificate.to_bytes(), 0o644, overwrite)


def public_line(public: bytes) -> str:
    return PUBLIC_PREFIX + base64.b64encode(public).decode("ascii") + "\n"


def parse_public(text: str, where: str = "public key") -> bytes:
    """A public key from its ``privfer-ed25519 <base64>`` line (or the bare base64)."""
    value = text.strip().removeprefix(PUBLIC_PREFIX.strip()).strip()
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
        Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, UnicodeEncodeError):
        raise ValueError(f"{where} is not an Ed25519 public key ('{PUBLIC_PREFIX}<base64 of 32 bytes>')") from None
    return raw


def load_public(path: str | Path) -> bytes:
    path = Path(path)
    try:
        return parse_public(path.read_text(), str(path))
    except OSError as exc:
        raise ValueError(f"cannot read public key {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class RosterCertificate:
    """The enrollment authority's signed list of a study's members: id -> Ed25519 public key.

    Build one with :meth:`EnrollmentAuthority.certify`; read one with :meth:`load`, which checks it against the
    pinned authority key, the study and the validity period before anything trusts it."""

    study: str
    not_before: int
    not_after: int
    authority: bytes
    members: Mapping[int, bytes]
    signature: bytes = b""
    _keys: dict[bytes, int] = field(default_factory=dict, compare=False, repr=False)

    def signed_bytes(self) -> bytes:
        ids = sorted(self.members)
        parts = [CERT_MAGIC, bytes([CERT_VERSION]), _study_bytes(self.study),
                 struct.pack(">QQ", self.not_before, self.not_after), self.authority, struct.pack(">I", len(ids))]
        parts.extend(struct.pack(">I", member) + self.members[member] for member in ids)
        return b"".join(parts)

    def to_bytes(self) -> bytes:
        return self.signed_bytes() + self.signature

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.to_bytes()).digest()

    def public_key(self, member: int) -> bytes:
        """The enrolled key of ``member``; :class:`UnenrolledClient` if the certificate does not list it."""
        key = self.members.get(member)
        if key is None:
            raise UnenrolledClient(f"client {member} is not enrolled in study {self.study!r}")
        return key

    @classmethod
    def parse(cls, raw: bytes) -> "RosterCertificate":
        """Decode (without verifying: use :meth:`load`); :class:`InvalidCertificate` on malformed bytes."""
        reader = ByteReader(bytes(raw), InvalidCertificate, "roster certificate")
        take = reader.take
        if take(4) != CERT_MAGIC:
            raise InvalidCertificate("not a privfer roster certificate (bad magic)")
        if take(1)[0] != CERT_VERSION:
            raise InvalidCertificate(f"roster certificate version is not {CERT_VERSION}")
        try:
            study = take(take(1)[0]).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidCertificate("the certificate's study id is not UTF-8") from None
        if not study:
            raise InvalidCertificate("the certificate's study id is empty")
        not_before, not_after = reader.u64(), reader.u64()
        authority = take(PUBLIC_BYTES)
        count = reader.u32()
        if count > MAX_MEMBERS or count * (4 + PUBLIC_BYTES) > reader.left:
            raise InvalidCertificate(f"the certificate claims {count} members, more than it holds or "
                                     f"{MAX_MEMBERS}")
        members: dict[int, bytes] = {}
        last = 0
        for _ in range(count):
            member = reader.u32()
            if not last < member <= MAX_MEMBER_ID:
                raise InvalidCertificate(f"member ids must be increasing in 1..{MAX_MEMBER_ID} ({member} after "
                                         f"{last})")
            members[member] = take(PUBLIC_BYTES)
            last = member
        signature = take(SIGNATURE_BYTES)
        reader.end()
        return cls._build(study, not_before, not_after, authority, members, signature)

    @classmethod
    def _build(cls, study: str, not_before: int, not_after: int, authority: bytes, members: Mapping[int, bytes],
               signature: bytes) -> "RosterCertificate":
        keys: dict[bytes, int] = {}
        for member, key in members.items():
            if len(key) != PUBLIC_BYTES:
                raise InvalidCertificate(f"member {member}'s key is not {PUBLIC_BYTES} bytes")
            if key in keys:
                raise InvalidCertificate(f"members {keys[key]} and {member} are enrolled with the same key")
            keys[key] = member
        return cls(study, not_before, not_after, authority, MappingProxyType(dict(sorted(members.items()))),
                   signature, keys)

    def verify(self, authority: bytes, study: str | None = None, now: float | None = None) -> "RosterCertificate":
        """Check the signature against the PINNED ``authority`` key, the study (when given) and the validity
        period; returns the certificate. :class:`InvalidCertificate` naming the failed check otherwise."""
        if self.authority != authority:
            raise InvalidCertificate(f"the certificate is issued by authority {fingerprint(self.authority)}, "
                                     f"not the pinned {fingerprint(authority)}")
        try:
            verify_signature(authority, self.signed_bytes(), self.signature, "roster certificate")
        except InvalidSignature:
            raise InvalidCertificate("the roster certificate's signature does not verify") from None
        if study is not None and self.study != study:
            raise InvalidCertificate(f"the certificate is for study {self.study!r}, not {study!r}")
        moment = time.time() if now is None else now
        if not self.not_before <= moment <= self.not_after:
            raise InvalidCertificate(f"the roster certificate is valid from {self.not_before} to {self.not_after} "
                                     f"(unix time), not at {int(moment)}")
        return self

    @classmethod
    def load(cls, raw: bytes, authority: bytes, study: str | None = None,
             now: float | None = None) -> "RosterCertificate":
        """Decode and verify (see :meth:`verify`)."""
        return cls.parse(raw).verify(authority, study, now)


class EnrollmentAuthority:
    """The party that enrolls members and signs the roster certificate — never the aggregation server."""

    def __init__(self, identity: Identity | None = None) -> None:
        self.identity = identity or Identity.generate()

    @property
    def public(self) -> bytes:
        return self.identity.public

    def certify(self, study: str, members: Mapping[int, bytes], *, valid_seconds: float = 365 * 86400.0,
                not_before: float | None = None) -> RosterCertificate:
        """Sign ``members`` (id -> Ed25519 public key) for ``study``, valid from ``not_before`` (default: now)."""
        _study_bytes(study)
        if not members:
            raise ValueError("a roster certificate enrolls at least one member")
        if len(members) > MAX_MEMBERS:
            raise ValueError(f"at most {MAX_MEMBERS} members per certificate")
        bad = [m for m in members if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_MEMBER_ID]
        if bad:
            raise ValueError(f"member ids must be integers in 1..{MAX_MEMBER_ID}, got {bad[:5]}")
        if not valid_seconds > 0:
            raise ValueError("valid_seconds must be positive")
        start = int(time.time() if not_before is None else not_before)
        try:
            unsigned = RosterCertificate._build(study, start, int(start + valid_seconds), self.public,
                                                {int(m): bytes(k) for m, k in members.items()}, b"")
        except InvalidCertificate as exc:
            raise ValueError(str(exc)) from None
        signature = self.identity.sign(unsigned.signed_bytes())
        return RosterCertificate._build(unsigned.study, unsigned.not_before, unsigned.not_after, unsigned.authority,
                                        unsigned.members, signature)


@dataclass(frozen=True)
class Enrollment:
    """What one member brings to an active-security round: its member id and key, the certificate it trusts
    (already checked against the pinned authority key), and the study id signatures are bound to."""

    member: int
    identity: Identity
    certificate: RosterCertificate
    _rounds: set = field(default_factory=set, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.certificate.members.get(self.member) != self.identity.public:
            raise UnenrolledClient(f"member {self.member} is not enrolled with this identity key in study "
                                   f"{self.certificate.study!r}")

    @property
    def study(self) -> str:
        return self.certificate.study

    def claim(self, round_id: str) -> None:
        """Record that this member advertises keys in ``round_id``; a second time is refused. Defence in depth:
        what makes a copy of a round harmless is that statements and shares bind the roster's key table (fresh
        round keys in a copy give another statement). The record lives in this object (the process); the Flower
        node keeps its own in its ``Context`` for the run (membership.claim_round)."""
        if round_id in self._rounds:
            raise WrongRound(f"member {self.member} already took part in round {round_id!r}; a member joins each "
                             "round id once")
        self._rounds.add(round_id)

    def check_validity(self, now: float | None = None) -> None:
        """The certificate's validity period, checked again when a round starts (it was checked at loading)."""
        moment = time.time() if now is None else now
        if not self.certificate.not_before <= moment <= self.certificate.not_after:
            raise InvalidCertificate(f"the roster certificate of study {self.study!r} is valid from "
                                     f"{self.certificate.not_before} to {self.certificate.not_after} (unix time), "
                                     f"not at {int(moment)}")


def enroll_in_process(members: "list[int] | range", study: str = "privfer-simulation",
                      authority: EnrollmentAuthority | None = None) -> dict[int, Enrollment]:
    """An in-process authority (a different object from the server) that enrolls ``members`` with fresh keys:
    for simulations and tests. Returns each member's :class:`Enrollment`."""
    authority = authority or EnrollmentAuthority()
    identities = {int(m): Identity.generate() for m in members}
    certificate = authority.certify(study, {m: identity.public for m, identity in identities.items()})
    return {m: Enrollment(m, identity, certificate) for m, identity in identities.items()}


__all__ = ["Enrollment", "EnrollmentAuthority", "Identity", "PUBLIC_BYTES", "RosterCertificate", "SIGNATURE_BYTES",
           "enroll_in_process", "fingerprint", "load_public", "parse_public", "public_line", "verify_signature",
           "write_certificate"]
