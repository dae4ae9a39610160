"""The privacy ledger of a run: per client, everything needed to recompute its epsilon without privfer.

Schema ``privfer.privacy_ledger/2`` (documented in docs/privacy-accounting.md;
``/1`` ledgers are ``local`` ledgers without the ``mechanism_id`` field):
run-level fields (mechanism id, unit, mechanism, accountant, target epsilon,
delta, clipping bound, noise source) and one entry per client and phase.

* ``local`` (DP-SGD on each client, Opacus): an entry holds the client's
  record count, noise multiplier, sample rate, steps, rounds trained, the
  Opacus accountant history ``[[noise_multiplier, sample_rate, steps], ...]``
  in training order, delta, and the epsilon the named accountant gives.
* ``distributed`` / ``distributed_person`` (the noise in the secure sum; a record or a whole
  person protected): the run-level ``phases``
  section holds each phase's plan (integer scale, dimension, sensitivities
  l1 / l2, the least variance ``mu`` of any released sum, the share variance,
  clients per round, minimum inputs, colluders assumed, sample rate, modulus,
  noise family); the run-level ``noise`` names the family
  (:mod:`privfer.privacy.noise`; a ledger without it was written when Skellam
  was the only one) and an entry's history holds that family's fields, e.g.
  ``[[mu, l1, l2, sample_rate, steps]]`` for Skellam.

A client's history composes every round it took part in, so its epsilon is
its spend over the whole run.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from privfer.privacy.calibrate import epsilon_spent
from privfer.privacy.mechanisms import select
from privfer.privacy.mechanisms.local import MECHANISM as _LOCAL
from privfer.runs import atomic_write_json

SCHEMA = "privfer.privacy_ledger/2"
LOCAL = _LOCAL.id  # the mechanism id of a ledger of Opacus histories: local DP-SGD, and runs without DP
LEGACY_SCHEMAS = ("privfer.privacy_ledger/1",)  # local ledgers written before mechanism_id existed

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
    unit: str = "record",
) -> dict[str, Any]:
    """The ledger dictionary (JSON-safe) with each client's epsilon computed by ``accountant`` (``unit``: the
    configured one; without DP it is only stated)."""
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
    stated = _LOCAL.ledger_statement()
    return {
        "schema": SCHEMA,
        "mechanism_id": LOCAL,
        "unit": unit,
        "mechanism": stated["mechanism"],
        "private": target_epsilon is not None,
        "accountant": accountant,
        "target_epsilon": target_epsilon,
        "delta": delta,
        "max_grad_norm": max_grad_norm,
        "noise_source": noise_source,
        "neighbouring_relation": stated["neighbouring_relation"],
        "public": stated["public"],
        "not_covered": list(not_covered or []),
        "epsilon_max": max(spent) if spent else None,
        "epsilon_median": statistics.median(spent) if spent else None,
        "clients": clients,
    }


def build_distributed_ledger(
    accounts: list[DistributedAccount],
    plans: dict[str, Any],
    *,
    noise_source: str,
    max_rounds: dict[str, int],
    not_covered: list[str] | None = None,
    unit: str = "record",
    persons: int | None = None,
    security: str = "semi_honest",
) -> dict[str, Any]:
    """The ledger of a distributed-DP run (record or person ``unit``): each phase's plan and each client's
    history (in its noise family's fields) and epsilon. ``persons``: the federation's persons, the count delta is
    judged against at person level."""
    mechanism = select("distributed", unit)
    first = next(iter(plans.values()))
    family = first.family
    stated = mechanism.ledger_statement(noise=family.title)
    if any(plan.noise != family.name for plan in plans.values()):
        raise ValueError("every phase of a run uses one noise family")

    clients = []
    for account in sorted(accounts, key=lambda a: (a.phase, a.client)):
        plan = plans[account.phase]
        entry = plan.steps_entry(account.rounds_trained)
        epsilon = family.epsilon([entry], plan.delta)[0]
        clients.append(
            {
                "client": account.client,
                "phase": account.phase,
                # person level: how many clips a person recorded is theirs too, and enters no released quantity
                "records": None if unit == "person" else account.records,
                "rounds_trained": account.rounds_trained,
                "steps": account.rounds_trained,
                "max_rounds": max_rounds.get(account.phase, 0),
                "history": [family.entry(entry)] if account.rounds_trained else [],
                "delta": plan.delta,
                "epsilon": epsilon,
                "accountant": family.accountant,
            }
        )
    spent = [c["epsilon"] for c in clients]
    return {
        "schema": SCHEMA,
        "mechanism_id": mechanism.id,
        "unit": unit,
        "mechanism": stated["mechanism"],
        "noise": family.name,
        "private": True,
        "accountant": family.accountant,
        "accounting": family.accounting,
        "target_epsilon": first.target_epsilon,
        "delta": first.delta,
        "max_grad_norm": first.max_grad_norm,
        "noise_source": noise_source,
        "neighbouring_relation": stated["neighbouring_relation"],
        "trust": {
            **_server_trust(security),
            "colluding_clients": "at most 'colluders' of a round's clients collude with the server (they know and "
            "can subtract their own noise shares)",
            "minimum_inputs": "clients refuse to unmask a round with fewer than 'min_inputs' included inputs, so a "
            "released sum holds at least min_inputs - colluders honest shares of variance mu / (min_inputs - "
            "colluders): at least mu",
            "noise_shares": {
                "os": "drawn by each client from ChaCha20 keyed by 32 fresh bytes of the OS CSPRNG",
                "run_key": "drawn by each client from ChaCha20 keyed by HMAC-SHA256 of the run's secret key (drawn "
                "from the OS, kept only in the run's checkpoint)",
                "run_seed": "drawn from ChaCha20 keyed by the PUBLIC run seed: anyone holding the config can "
                "recompute every share; for reproducible experiments only, no guarantee against them",
            }.get(noise_source, noise_source),
        },
        "phases": {phase: plan.to_dict() for phase, plan in plans.items()},
        **({"persons": persons} if persons is not None else {}),
        "public": stated["public"],
        **({"secret_participation": stated["secret_participation"]} if "secret_participation" in stated else {}),
        "not_covered": list(not_covered or []),
        "epsilon_max": max(spent) if spent else None,
        "epsilon_median": statistics.median(spent) if spent else None,
        "clients": clients,
    }


def _server_trust(security: str) -> dict[str, str]:
    """What the ledger's guarantee assumes of the server (docs/threat-model.md states it once, in full)."""
    if security == "active":
        return {
            "security": "active",
            "server": "may deviate from the protocol arbitrarily: lie about dropouts, show clients different "
            "rosters, survivor sets, models or plans, replay, drop or invent messages and clients",
            "enrollment": "an enrollment authority that is not the server signs the roster of members' keys and is "
            "trusted to enroll real, distinct persons; every key advertisement is signed by its member",
            "equivocation": "covered: a round lists at least max(floor((n + colluders) / 2) + 1, min_inputs) "
            "survivors and no client reveals a share before every one of them signed exactly its statement (round, "
            "roster, survivors, model and plan digest, config), so two views of one round cannot both be unmasked, "
            "clients given different models cannot share a released sum, and every released sum holds at least "
            "min_inputs - colluders honest noise shares (protocols/secagg/SPEC.md, sections 5.2 and 6.4)",
        }
    return {
        "security": "semi_honest",
        "server": "honest-but-curious: follows the protocol, sees every message it receives",
        "equivocation": "not covered: a server that sends different clients different unmask requests (or "
        "rosters) can isolate one client's input with a colluder; run with aggregation.security 'active'",
    }


def write_ledger(path: Path, ledger: dict[str, Any]) -> None:
    atomic_write_json(path, ledger)


__all__ = ["ClientAccount", "DistributedAccount", "LEGACY_SCHEMAS", "LOCAL",
           "SCHEMA", "account_from_state", "build_distributed_ledger", "build_ledger", "write_ledger"]
