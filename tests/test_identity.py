"""Members' identities and the enrollment authority's roster certificate (secagg/identity.py, privfer identity|enroll)."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from privfer.cli import app
from privfer.secagg.errors import InvalidCertificate, InvalidSignature, UnenrolledClient
from privfer.secagg.identity import (
    Enrollment,
    EnrollmentAuthority,
    Identity,
    RosterCertificate,
    load_public,
    verify_signature,
)

runner = CliRunner()


def make_certificate(members=3, study="study-1", **kwargs):
    authority = EnrollmentAuthority()
    identities = {m: Identity.generate() for m in range(1, members + 1)}
    certificate = authority.certify(study, {m: i.public for m, i in identities.items()}, **kwargs)
    return authority, identities, certificate


def test_a_certificate_round_trips_and_verifies_only_against_its_authority():
    authority, identities, certificate = make_certificate()
    loaded = RosterCertificate.load(certificate.to_bytes(), authority.public, "study-1")
    assert loaded == certificate and loaded.public_key(2) == identities[2].public
    with pytest.raises(InvalidCertificate, match="not the pinned"):
        RosterCertificate.load(certificate.to_bytes(), Identity.generate().public)
    with pytest.raises(InvalidCertificate, match="not 'study-2'"):
        RosterCertificate.load(certificate.to_bytes(), authority.public, "study-2")
    with pytest.raises(UnenrolledClient):
        certificate.public_key(4)


def test_a_certificate_outside_its_validity_is_refused():
    authority, _, certificate = make_certificate(not_before=1_000_000, valid_seconds=100)
    raw = certificate.to_bytes()
    RosterCertificate.load(raw, authority.public, now=1_000_050)
    for moment in (999_999, 1_000_101):
        with pytest.raises(InvalidCertificate, match="valid from"):
            RosterCertificate.load(raw, authority.public, now=moment)


@settings(max_examples=60, deadline=None)
@given(position=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_any_altered_byte_of_a_certificate_is_refused(position, bit):
    """A member added, a key swapped, the study or validity changed: every flipped bit fails to verify or parse."""
    authority, _, certificate = make_certificate()
    raw = bytearray(certificate.to_bytes())
    raw[position % len(raw)] ^= 1 << bit
    with pytest.raises(InvalidCertificate):
        RosterCertificate.load(bytes(raw), authority.public, now=certificate.not_before + 1)


def test_malformed_certificates_raise_a_specific_error_and_bound_their_work():
    authority, _, certificate = make_certificate()
    raw = certificate.to_bytes()
    for bad in (b"", b"XXXX" + raw[4:], raw[:-1], raw + b"\x00", raw[:40]):
        with pytest.raises(InvalidCertificate):
            RosterCertificate.parse(bad)
    # a header that claims 4 billion members in a few bytes is refused before any allocation
    header = raw[: raw.index(certificate.authority) + 32]
    with pytest.raises(InvalidCertificate, match="claims"):
        RosterCertificate.parse(header + (0xFFFFFFFF).to_bytes(4, "big") + bytes(64))


def test_the_authority_refuses_bad_rosters():
    authority = EnrollmentAuthority()
    key = Identity.generate().public
    with pytest.raises(ValueError, match="same key"):
        authority.certify("s", {1: key, 2: key})
    with pytest.raises(ValueError, match="member ids"):
        authority.certify("s", {0: key})
    with pytest.raises(ValueError, match="at least one"):
        authority.certify("s", {})


def test_an_enrollment_must_match_the_certificate():
    _, identities, certificate = make_certificate()
    Enrollment(1, identities[1], certificate)
    with pytest.raises(UnenrolledClient):
        Enrollment(1, identities[2], certificate)
    with pytest.raises(UnenrolledClient):
        Enrollment(9, identities[1], certificate)


def test_signatures_verify_only_on_their_message_and_key():
    me, other = Identity.generate(), Identity.generate()
    signature = me.sign(b"statement")
    verify_signature(me.public, b"statement", signature, "test")
    for public, message, sig in [(other.public, b"statement", signature), (me.public, b"statemenT", signature),
                                 (me.public, b"statement", signature[:-1] + bytes([signature[-1] ^ 1])),
                                 (me.public, b"statement", signature[:10])]:
        with pytest.raises(InvalidSignature):
            verify_signature(public, message, sig, "test")


def test_keys_are_written_owner_only_never_overwritten_and_refused_when_others_can_read(tmp_path):
    identity = Identity.generate()
    key = tmp_path / "me.key"
    public_path = identity.save(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert load_public(public_path) == identity.public == Identity.load(key).public
    assert identity.sign(b"x") == Identity.load(key).sign(b"x")  # Ed25519 is deterministic: the same key
    with pytest.raises(FileExistsError):
        Identity.generate().save(key)
    assert Identity.load(key).public == identity.public  # untouched
    os.chmod(key, 0o640)
    with pytest.raises(ValueError, match="readable by others"):
        Identity.load(key)
    assert "PRIVATE" not in repr(identity) and identity.fingerprint in repr(identity)


def test_the_cli_creates_keys_enrolls_members_and_shows_a_certificate(tmp_path):
    paths = {name: tmp_path / f"{name}.key" for name in ("authority", "alice", "bob")}
    for name, path in paths.items():
        result = runner.invoke(app, ["identity", "new", str(path)])
        assert result.exit_code == 0, result.output
        assert "PRIVATE" not in result.output  # the private key is never printed
    listing = tmp_path / "members.txt"
    listing.write_text("# id key\n" + f"2 {(tmp_path / 'bob.key.pub').read_text()}")
    cert = tmp_path / "roster.cert"
    result = runner.invoke(app, ["enroll", "--authority", str(paths["authority"]), "--study", "class-7",
                                 "--member", f"1={tmp_path / 'alice.key.pub'}", "--members", str(listing),
                                 "--out", str(cert)])
    assert result.exit_code == 0, result.output
    certificate = RosterCertificate.load(cert.read_bytes(), load_public(tmp_path / "authority.key.pub"), "class-7")
    assert certificate.members == {1: Identity.load(paths["alice"]).public, 2: Identity.load(paths["bob"]).public}
    shown = runner.invoke(app, ["identity", "show", str(cert), "--authority", str(tmp_path / "authority.key.pub")])
    assert shown.exit_code == 0 and "verified" in shown.output and "2 members" in shown.output
    # user errors: one line, exit 2, nothing overwritten
    for args in (["identity", "new", str(paths["alice"])],
                 ["identity", "show", str(cert), "--authority", str(tmp_path / "alice.key.pub")],
                 ["enroll", "--authority", str(paths["authority"]), "--study", "s", "--out", str(cert),
                  "--member", f"1={tmp_path / 'alice.key.pub'}"],
                 ["enroll", "--authority", str(paths["authority"]), "--study", "s", "--out", str(tmp_path / "x"),
                  "--member", "one=nothing"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
