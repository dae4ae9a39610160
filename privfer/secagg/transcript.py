"""What the server of one round records and what it learns: its transcript (every message in and out, with its
size on the wire) and the sum over the survivors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from privfer.secagg.messages import Message
from privfer.secagg.payload import Decoded


@dataclass
class TranscriptEntry:
    stage: str
    direction: str  # "in" (client -> server) or "out"
    party: int  # the client on the other end (0 = broadcast)
    size: int  # bytes on the wire
    message: Message


@dataclass
class ServerTranscript:
    """Everything the server received and sent in one round."""

    entries: list[TranscriptEntry] = field(default_factory=list)

    def received(self, kind: type[Message] | None = None) -> list[Message]:
        return [e.message for e in self.entries if e.direction == "in" and (kind is None or isinstance(e.message, kind))]

    def bytes_in(self, party: int | None = None) -> int:
        return sum(e.size for e in self.entries if e.direction == "in" and (party is None or e.party == party))

    def bytes_in_by_party(self) -> dict[int, int]:
        """Bytes received from each client, in one pass over the transcript."""
        totals: dict[int, int] = {}
        for e in self.entries:
            if e.direction == "in":
                totals[e.party] = totals.get(e.party, 0) + e.size
        return totals

    def bytes_out(self, party: int | None = None) -> int:
        return sum(e.size for e in self.entries if e.direction == "out" and (party is None or e.party in (party, 0)))


@dataclass
class ServerSum:
    """What the server learns: the sum over the survivors, and who they are."""

    words: np.ndarray
    included: tuple[int, ...]
    decoded: Decoded
    blamed: dict[int, tuple[int, ...]] = field(default_factory=dict)  # dealer -> holders whose complaint held
    false_complaints: dict[int, tuple[int, ...]] = field(default_factory=dict)  # holder -> dealers it accused


__all__ = ["ServerSum", "ServerTranscript", "TranscriptEntry"]
