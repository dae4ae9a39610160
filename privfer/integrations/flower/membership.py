"""A node's membership for active security: its identity key, the roster certificate and the pinned authority.

Under active security (``SecAggGrid(security="active")``, the default) every node
is a member of the study's roster certificate, signed by an enrollment
authority that is not the server (``privfer identity new``, ``privfer
enroll``). The node's policy — which authority it trusts, the colluding fraction
and the smallest rounds it accepts — comes from its own configuration, never
from the server: a server that sends a semi-honest config, a lower colluding
fraction or another study is refused.

Node config keys (``flower-supernode --node-config``): ``identity-key`` (the
member's private key file, 0600), ``roster-certificate``, ``authority-key``
(the authority's public key file: the pin), optionally ``study`` and
``min-colluding-fraction`` (default 0.1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from privfer.integrations.flower.common import Context, ConfigRecord
from privfer.secagg.config import SecAggConfig
from privfer.secagg.errors import SecAggError, WrongRound
from privfer.secagg.identity import Enrollment, Identity, RosterCertificate, load_public

JOINED = "privfer.secagg.joined"  # Context.state: the round ids this node has joined (a member joins each once)
MAX_JOINED = 4096


class MembershipError(SecAggError):
    """This node's membership cannot take part: its files are missing or do not verify, or the server asks for a
    weaker round than the node's own policy accepts."""


@dataclass
class NodeMembership:
    """What a node needs for active security, all from its own disk and configuration."""

    identity_key: Path
    certificate: Path
    authority_key: Path
    study: str | None = None
    min_colluding_fraction: float = 0.1
    _enrollment: Enrollment | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("identity_key", "certificate", "authority_key"):
            path = Path(getattr(self, name))
            if not path.is_absolute():
                raise ValueError(f"{name} must be an absolute path (a SuperNode's working directory is not yours), "
                                 f"got {path}")
            setattr(self, name, path)
        if not 0.0 <= self.min_colluding_fraction < 0.5:
            raise ValueError(f"min_colluding_fraction must be in [0, 0.5), got {self.min_colluding_fraction}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "NodeMembership | None":
        """From ``identity-key``, ``roster-certificate``, ``authority-key`` (and optionally ``study``,
        ``min-colluding-fraction``); None when the node config names no identity key."""
        if "identity-key" not in node_config:
            return None
        missing = [k for k in ("roster-certificate", "authority-key") if k not in node_config]
        if missing:
            raise ValueError(f"a node with an identity-key also needs {missing} in its node config")
        study = node_config.get("study")
        return cls(Path(str(node_config["identity-key"])), Path(str(node_config["roster-certificate"])),
                   Path(str(node_config["authority-key"])), None if study is None else str(study),
                   float(node_config.get("min-colluding-fraction", 0.1)))

    @staticmethod
    def from_node_config_of(ctxt: Context) -> "NodeMembership | None":
        """:meth:`from_node_config` of a node's ``Context`` (make_secagg_mod's default)."""
        return NodeMembership.from_node_config(ctxt.node_config)

    def enrollment(self) -> Enrollment:
        """The member's enrollment: the key file, the certificate checked against the pinned authority key and
        the study, and the member id the certificate lists for this key (loaded once)."""
        if self._enrollment is None:
            try:
                identity = Identity.load(self.identity_key)
                certificate = RosterCertificate.load(self.certificate.read_bytes(), load_public(self.authority_key),
                                                     self.study)
            except (OSError, ValueError, SecAggError) as exc:
                raise MembershipError(f"this node's membership does not load: {exc}") from None
            members = [m for m, key in certificate.members.items() if key == identity.public]
            if not members:
                raise MembershipError(f"this node's identity key is not enrolled in study {certificate.study!r}")
            self._enrollment = Enrollment(members[0], identity, certificate)
        return self._enrollment

    def accept(self, config: SecAggConfig) -> None:
        """Refuse a round weaker than this node's policy: the server chooses the config it sends."""
        if config.security != "active":
            raise MembershipError("this node takes part only in rounds with security 'active'; the server asked "
                                  f"for {config.security!r}")
        if config.colluding_fraction < self.min_colluding_fraction:
            raise MembershipError(f"the round assumes colluding_fraction {config.colluding_fraction:g}; this node "
                                  f"requires at least {self.min_colluding_fraction:g}")


def claim_round(ctxt: Context, round_id: str) -> None:
    """Record in the node's Context that it joined ``round_id``; a round id it already joined is refused (a server
    cannot run copies of one round to collect the node's signature twice). Bounded to the last MAX_JOINED."""
    record = ctxt.state.config_records.get(JOINED)
    joined = json.loads(str(record["ids"])) if record is not None else []
    if round_id in joined:
        raise WrongRound(f"this node already took part in round {round_id!r}; a member joins each round id once")
    joined = [*joined, round_id][-MAX_JOINED:]
    ctxt.state.config_records[JOINED] = ConfigRecord({"ids": json.dumps(joined)})


__all__ = ["MembershipError", "NodeMembership", "claim_round"]
