"""``privfer identity new|show`` and ``privfer enroll``: members' signing keys and the authority's roster certificate.

Thin commands over :mod:`privfer.secagg.identity`. A private key is written
0600 and never printed or logged; ``show`` prints public keys and
fingerprints only.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.table import Table

from privfer.cli.common import app, console, print_error
from privfer.secagg.errors import InvalidCertificate
from privfer.secagg.identity import (CERT_MAGIC, EnrollmentAuthority, Identity, RosterCertificate, fingerprint,
                                     load_public, parse_public, public_line, write_certificate)

identity_app = typer.Typer(help="Members' long-term signing keys (Ed25519) for active security.",
                           no_args_is_help=True)
app.add_typer(identity_app, name="identity")


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad paths, keys or certificates: one line on stderr, exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ValueError, OSError, InvalidCertificate) as exc:
            print_error(str(exc))
            raise typer.Exit(2) from None

    return wrapper


@identity_app.command("new")
@_user_errors
def identity_new(
    key: Path = typer.Argument(..., help="Where to write the private key (0600); the public key goes to KEY.pub."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key (the old one is lost)."),
) -> None:
    """Create a signing key pair. Give KEY.pub to the enrollment authority; keep KEY to yourself."""
    identity = Identity.generate()
    public_path = identity.save(key, overwrite=force)
    console.print(f"wrote {key} (private, 0600) and {public_path}; fingerprint {identity.fingerprint}",
                  highlight=False)


@identity_app.command("show")
@_user_errors
def identity_show(
    path: Path = typer.Argument(..., help="A private key, a public key (.pub) or a roster certificate."),
    authority: Optional[Path] = typer.Option(None, "--authority",
                                             help="The authority's public key: verify a certificate against it."),
    study: Optional[str] = typer.Option(None, "--study", help="With --authority: the study the certificate is for."),
) -> None:
    """Print a key's public half and fingerprint, or a certificate's study, validity and members."""
    raw = path.read_bytes()
    if raw.startswith(CERT_MAGIC):
        certificate = RosterCertificate.parse(raw)
        verdict = "not verified (pass --authority)"
        if authority is not None:
            certificate.verify(load_public(authority), study)
            verdict = "verified against the pinned authority key"
        console.print(f"roster certificate for study {certificate.study!r}: {len(certificate.members)} members, "
                      f"valid {certificate.not_before}..{certificate.not_after} (unix time), authority "
                      f"{fingerprint(certificate.authority)}, {verdict}", highlight=False, soft_wrap=True)
        table = Table()
        table.add_column("member", justify="right")
        table.add_column("key fingerprint")
        for member, key in certificate.members.items():
            table.add_row(str(member), fingerprint(key))
        console.print(table)
        return
    if raw.lstrip().startswith(b"-----BEGIN"):
        public = Identity.load(path).public
    else:
        public = parse_public(raw.decode("ascii", errors="replace"), str(path))
    console.print(public_line(public).strip() + f"\nfingerprint {fingerprint(public)}", highlight=False)


def _members(pairs: List[str], listing: Optional[Path]) -> dict[int, bytes]:
    """``ID=PUBFILE`` pairs and lines ``ID <public key>`` of a members file -> id -> key."""
    members: dict[int, bytes] = {}

    def add(text_id: str, key: bytes, where: str) -> None:
        try:
            member = int(text_id)
        except ValueError:
            raise ValueError(f"{where}: member id {text_id!r} is not an integer") from None
        if member in members:
            raise ValueError(f"{where}: member {member} is listed twice")
        members[member] = key

    for pair in pairs:
        text_id, sep, file = pair.partition("=")
        if not sep:
            raise ValueError(f"--member takes ID=PUBFILE, got {pair!r}")
        add(text_id, load_public(file), f"--member {pair}")
    if listing is not None:
        for number, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            text_id, _, key = line.strip().partition(" ")
            add(text_id, parse_public(key, f"{listing}:{number}"), f"{listing}:{number}")
    if not members:
        raise ValueError("no members: pass --member ID=PUBFILE (repeatable) or --members FILE")
    return members


@app.command()
@_user_errors
def enroll(
    authority: Path = typer.Option(..., "--authority", help="The enrollment authority's private key."),
    study: str = typer.Option(..., "--study", help="The study id every signature is bound to."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the roster certificate."),
    member: List[str] = typer.Option([], "--member", help="ID=PUBFILE, one per member (repeatable)."),
    members: Optional[Path] = typer.Option(None, "--members", help="A file of lines 'ID <public key>'."),
    valid_days: float = typer.Option(365.0, "--valid-days", help="Validity from now, in days."),
    force: bool = typer.Option(False, "--force", help="Replace an existing certificate."),
) -> None:
    """Sign the roster certificate: the study's members and their public keys. Run by the authority, never the
    aggregation server; every member pins the authority's public key."""
    if not valid_days > 0:
        raise ValueError(f"--valid-days must be positive, got {valid_days:g}")
    signer = EnrollmentAuthority(Identity.load(authority))
    certificate = signer.certify(study, _members(member, members), valid_seconds=valid_days * 86400.0)
    write_certificate(out, certificate, overwrite=force)
    console.print(f"wrote {out}: {len(certificate.members)} members of study {study!r}, authority "
                  f"{signer.identity.fingerprint}", highlight=False)
