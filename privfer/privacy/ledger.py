"""The privacy ledger of a run: per client, everything needed to recompute its epsilon without privfer.

Schema ``privfer.privacy_ledger/1`` (documented in docs/privacy-accounting.md):
run-level fields (unit, mechanism, accountant, target epsilon, delta, clipping
bound, noise source) and one entry per client and phase with its record
count, noise multiplier, sample rate, steps, rounds trained, the Opacus
accountant history ``[[noise_multiplier, sample_rate, steps], ...]`` in
training order, delta, and the epsilon the named accountant gives for that
history. A client's history composes every round it trained in, so its
epsilon is its spend over the whole run.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from privfer.privacy.calibrate import epsilon_spent
from privfer.runs import atomic_write_json

SCHEMA = "privfer.privacy_ledger/1"
MECHANISM = "DP-SGD (Opacus): per-example gradient clipping, Poisson-subsampled Gaussian noise"

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
        account = cls(**{k: v for k, v in state.items() if k != "history"})
        account.history = [(float(s), float(q), int(t)) for s, q, t in state["history"]]
        return account


def build_ledger(
    accounts: list[ClientAccount],
    *,
    target_epsilon: float | None,
    delta: float,
    accountant: str,
    max_grad_norm: float,
    noise_source: str,
    max_rounds: dict[str, int],
    not_covered: list[str] | None = None,
) -> dict[str, Any]:
    """The ledger dictionary (JSON-safe) with each client's epsilon computed by ``accountant``."""
    clients = []
    for account in sorted(accounts, key=lambda a: (a.phase, a.client)):
        epsilon, used = account.epsilon(delta, accountant)
        clients.append(
            {
                **account.to_state(),
                "steps": account.steps,
                "max_rounds": max_rounds.get(account.phase, 0),
                "delta": delta,
                "epsilon": epsilon,
                "accountant": used,
            }
        )
    spent = [c["epsilon"] for c in clients if c["epsilon"] is not None]
    return {
        "schema": SCHEMA,
        "unit": "record",
        "mechanism": MECHANISM,
        "private": target_epsilon is not None,
        "accountant": accountant,
        "target_epsilon": target_epsilon,
        "delta": delta,
        "max_grad_norm": max_grad_norm,
        "noise_source": noise_source,
        "neighbouring_relation": "add or remove one record (clip) of one client",
        "public": [
            "each client's record count: it sets the client's sample rate, steps and FedAvg weight, and is "
            "written here",
        ],
        "not_covered": list(not_covered or []),
        "epsilon_max": max(spent) if spent else None,
        "epsilon_median": statistics.median(spent) if spent else None,
        "clients": clients,
    }


def write_ledger(path: Path, ledger: dict[str, Any]) -> None:
    atomic_write_json(path, ledger)


__all__ = ["ClientAccount", "MECHANISM", "SCHEMA", "build_ledger", "write_ledger"]
