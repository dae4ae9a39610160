"""The stages of a pairwise-masking round, written once: what the server sends to open each, what it receives.

Every driver of a round walks :func:`round_stages` — the in-process recipe
(:func:`privfer.secagg.masking.aggregate`) and Flower's ``SecAggGrid``
(:mod:`privfer.integrations.flower.grid`) — so a protocol variant (the active
security's consistency stage, say) is one more entry here, not a change to
each driver. A stage is opened by the server's messages (:class:`Opening`: one
per client, the same one for all, or none for the first stage), answered by
each live client (:attr:`ProtocolStage.respond` is the in-process answer; a
deployed node answers with the same client method, behind its own checks) and
received by the server; :meth:`SecAggServer.finish` ends the last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from privfer.secagg.client import SecAggClient
from privfer.secagg.config import SecAggConfig
from privfer.secagg.messages import Message
from privfer.secagg.server import SecAggServer


@dataclass(frozen=True)
class Opening:
    """What the server sends to open a stage: ``addressed`` (client id -> its own message), ``broadcast`` (one
    message for every client), or neither (the round's first stage: the clients start it)."""

    addressed: Mapping[int, Message] | None = None
    broadcast: Message | None = None

    def __post_init__(self) -> None:
        if self.addressed is not None and self.broadcast is not None:
            raise ValueError("a stage is opened by addressed messages or by a broadcast, not both")


@dataclass(frozen=True)
class ProtocolStage:
    """One stage: its name (:data:`privfer.secagg.rounds.STAGES`), how the server opens it, how the server receives
    a client's answer, how a client answers in process, and whether the answer needs the round's model (the stage
    where a client trains and masks its input)."""

    name: str
    opens: Callable[[SecAggServer], Opening]
    receive: Callable[[SecAggServer, bytes, int], None]
    respond: Callable[[SecAggClient, Message | None, Mapping[str, Any]], Message]
    needs_model: bool = False


def _no_opening(server: SecAggServer) -> Opening:
    return Opening()


def round_stages(config: SecAggConfig) -> tuple[ProtocolStage, ...]:
    """The stages of a round under ``config`` (its roster and its security), in order."""
    group = config.roster == "group"  # each client gets its group's keys and its group's unmask request only
    stages = [
        ProtocolStage("advertise_keys", _no_opening,
                      lambda server, raw, cid: server.receive_advertise(raw, peer=cid),
                      lambda client, message, inputs: client.advertise_keys()),
        ProtocolStage("share_keys",
                      (lambda server: Opening(addressed=server.group_rosters())) if group
                      else (lambda server: Opening(broadcast=server.key_roster())),
                      lambda server, raw, cid: server.receive_share_keys(raw, peer=cid),
                      lambda client, message, inputs: client.share_keys(message)),
        ProtocolStage("masked_input", lambda server: Opening(addressed=server.forward_shares()),
                      lambda server, raw, cid: server.receive_masked_input(raw, peer=cid),
                      lambda client, message, inputs: client.masked_input(message, **inputs), needs_model=True),
    ]
    if config.security == "active":  # every survivor signs its view; the signatures go to all before any share
        stages += [
            ProtocolStage("consistency", lambda server: Opening(broadcast=server.unmask_request()),
                          lambda server, raw, cid: server.receive_consistency(raw, peer=cid),
                          lambda client, message, inputs: client.check_consistency(message)),
            ProtocolStage("unmask", lambda server: Opening(broadcast=server.signature_list()),
                          lambda server, raw, cid: server.receive_unmask(raw, peer=cid),
                          lambda client, message, inputs: client.unmask(message)),
        ]
    else:
        stages.append(
            ProtocolStage("unmask",
                          (lambda server: Opening(addressed=server.group_unmask_requests())) if group
                          else (lambda server: Opening(broadcast=server.unmask_request())),
                          lambda server, raw, cid: server.receive_unmask(raw, peer=cid),
                          lambda client, message, inputs: client.unmask(message)))
    return tuple(stages)


__all__ = ["Opening", "ProtocolStage", "round_stages"]
