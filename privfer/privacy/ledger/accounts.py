"""A run's accounts while it trains: per client and phase, what its ledger entry will be built from (checkpointed).

:class:`ClientAccount` keeps a local DP-SGD client's Opacus history;
:class:`DistributedAccount` counts the rounds whose released sum held a
client. :mod:`privfer.privacy.ledger.opacus` and
:mod:`privfer.privacy.ledger.secure_sum` turn them into a ledger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from privfer.privacy.calibrate import epsilon_spent

History = list[tuple[float, float, int]]


@lru_cache(maxsize=1024)
def _cached_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> tuple[float, str]:
    """Epsilon and the accountant that gave it: PRV's discretization fails for extreme budgets (epsilon in the
    hundreds), and then the RDP bound — looser, still sound — is recorded with its name."""
    try:
        return epsilon_spent(list(history), delta, accountant), accountant
    except (RuntimeError, ValueError, MemoryError, OverflowError, FloatingPointError):
        if accountant == "rdp":
            raise
        return epsilon_spent(list(history), delta, "rdp"), "rdp"


@dataclass
class ClientAccount:
    """One client's DP-SGD accounting within one phase of a run."""

    client: int
    phase: str  # "training" (phase 1) or "adaptation" (phase 2)
    records: int
    noise_multiplier: float | None
    sample_rate: float
    history: History = field(default_factory=list)
    rounds_trained: int = 0

    @property
    def steps(self) -> int:
        return sum(int(steps) for _, _, steps in self.history)

    def record_round(self, history: History) -> None:
        """Store the accountant's history after a round the client trained in."""
        self.history = [(float(s), float(q), int(t)) for s, q, t in history]
        self.rounds_trained += 1

    def epsilon(self, delta: float, accountant: str) -> tuple[float | None, str]:
        """(epsilon, accountant used); (None, accountant) without DP."""
        if self.noise_multiplier is None:
            return None, accountant  # trained without DP: no finite epsilon
        return _cached_epsilon(tuple(self.history), float(delta), accountant)

    def to_state(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "phase": self.phase,
            "records": self.records,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "history": [list(h) for h in self.history],
            "rounds_trained": self.rounds_trained,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ClientAccount":
        account = cls(**{k: v for k, v in state.items() if k not in ("history", "kind")})
        account.history = [(float(s), float(q), int(t)) for s, q, t in state["history"]]
        return account


@dataclass
class DistributedAccount:
    """One client's part in distributed DP-SGD within one phase: the rounds whose released sum held its records."""

    client: int
    phase: str
    records: int
    rounds_trained: int = 0

    def record_round(self) -> None:
        self.rounds_trained += 1

    def to_state(self) -> dict[str, Any]:
        return {"kind": "distributed", "client": self.client, "phase": self.phase, "records": self.records,
                "rounds_trained": self.rounds_trained}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "DistributedAccount":
        return cls(int(state["client"]), str(state["phase"]), int(state["records"]), int(state["rounds_trained"]))


def account_from_state(state: dict[str, Any]) -> ClientAccount | DistributedAccount:
    """A checkpointed account of either mechanism."""
    if state.get("kind") == "distributed":
        return DistributedAccount.from_state(state)
    return ClientAccount.from_state(state)


__all__ = ["ClientAccount", "DistributedAccount", "History", "account_from_state"]
