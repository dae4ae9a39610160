"""The ledger of distributed DP (record or person level): the noise in the secure sum, each phase's plan.

The run-level ``phases`` section holds each phase's plan (integer scale,
dimension, sensitivities l1 / l2, the least variance ``mu`` of any released
sum, the share variance, clients per round, minimum inputs, colluders assumed,
sample rate, modulus, noise family); ``noise`` names the family
(:mod:`privfer.privacy.noise`; a ledger without it was written when Skellam was
the only one) and an entry's history holds that family's fields, e.g.
``[[mu, l1, l2, sample_rate, steps]]`` for Skellam. Validation parses every
history entry with its family and holds it to its phase's plan (how many noise
shares over how many coordinates the plan guarantees) before any accountant
runs: a bound's cost may grow with the shares or the dimension it is given.
"""

from __future__ import annotations

import math
import statistics
from typing import Annotated, Any, ClassVar

from pydantic import Field, PrivateAttr, StrictInt, model_validator

from privfer.privacy.ledger.accounts import DistributedAccount
from privfer.privacy.ledger.base import (MAX_CLIENTS, MAX_HISTORY, SCHEMA, Count, Delta, EntryBase, LedgerBase, Model, Name,
                                         NonNegative, Number, Positive, Rate, Text)
from privfer.privacy.mechanisms import MECHANISMS, select
from privfer.privacy.noise import FAMILIES, LEGACY, NoiseFamily, NoiseSteps, noise_family

ACCOUNTING = "secure_sum"
MAX_PHASES = 8
MAX_DISTINCT_STEPS = 64  # distinct step mechanisms per ledger (a real run has one per phase)
MAX_ENTRIES = 1_000_000  # history entries over all clients


class PhasePlan(Model):
    """One phase's plan of the noise in the secure sum (:class:`privfer.privacy.distributed.DistributedPlan`)."""

    max_grad_norm: Positive
    dimension: Annotated[StrictInt, Field(ge=1, le=10**12)]
    scale: Positive
    l1: Positive
    l2: Positive
    mu: Positive
    share_variance: NonNegative
    sample_rate: Rate
    steps: Count
    clients: Annotated[StrictInt, Field(ge=1, le=MAX_CLIENTS)]
    min_inputs: Count
    colluders: Count
    delta: Delta
    # (absent in a ledger written before the field existed; never null)
    target_epsilon: Positive = None  # type: ignore[assignment]
    modulus_bits: Count = None  # type: ignore[assignment]
    sum_bound: Count = None  # type: ignore[assignment]
    records: Count
    noise: Name = None  # type: ignore[assignment]  # absent: written when Skellam was the only family
    noise_multiplier: Positive = None  # type: ignore[assignment]  # restated: sqrt(mu) / l2

    @property
    def honest(self) -> int:
        return self.min_inputs - self.colluders

    @model_validator(mode="after")
    def _arithmetic(self) -> "PhasePlan":
        if not 1 <= self.min_inputs - self.colluders <= self.clients:
            raise ValueError("needs 1 <= min_inputs - colluders <= clients")
        if self.noise_multiplier is not None and not math.isclose(self.noise_multiplier, math.sqrt(self.mu) / self.l2,
                                                                  rel_tol=1e-9):
            raise ValueError(f"field 'noise_multiplier' is {self.noise_multiplier!r}, but sqrt(mu) / l2 is "
                             f"{math.sqrt(self.mu) / self.l2!r}")
        return self


class SumEntry(EntryBase):
    """One client's part in one phase: the rounds whose released sum held it, as its family's history."""

    ORDER: ClassVar[tuple[str, ...]] = ("client", "phase", "records", "rounds_trained", "steps", "max_rounds",
                                        "history", "delta", "epsilon", "accountant")
    records: Count | None  # None at person level: how many clips a person recorded is theirs too
    history: Annotated[list[Annotated[list[Number], Field(max_length=16)]],
                       Field(max_length=MAX_HISTORY, fail_fast=True)]
    epsilon: NonNegative
    accountant: Name
    _steps: list[NoiseSteps] = PrivateAttr(default_factory=list)

    @property
    def noise_steps(self) -> list[NoiseSteps]:
        """The history parsed by the ledger's noise family (set when the ledger is validated)."""
        return self._steps


class SecureSumLedger(LedgerBase):
    """A distributed-DP ledger (mechanisms ``distributed`` and ``distributed_person``)."""

    ACCOUNTING: ClassVar[str] = ACCOUNTING
    ORDER: ClassVar[tuple[str, ...]] = (
        "schema", "mechanism_id", "unit", "mechanism", "noise", "private", "accountant", "accounting",
        "target_epsilon", "delta", "max_grad_norm", "noise_source", "neighbouring_relation", "trust", "phases",
        "persons", "public", "secret_participation", "not_covered", "epsilon_max", "epsilon_median", "clients")
    # (the optional sections are absent in a ledger written before they existed, or of the other unit; never null)
    noise: Name = None  # type: ignore[assignment]  # absent: written when Skellam was the only family
    accounting: Text = None  # type: ignore[assignment]
    trust: Annotated[dict[Name, Text], Field(max_length=32)] = None  # type: ignore[assignment]
    phases: Annotated[dict[Name, PhasePlan], Field(min_length=1, max_length=MAX_PHASES)]
    persons: Annotated[StrictInt, Field(ge=1, le=MAX_CLIENTS)] = None  # type: ignore[assignment]  # person level
    secret_participation: Text = None  # type: ignore[assignment]
    clients: Annotated[list[SumEntry], Field(max_length=MAX_CLIENTS, fail_fast=True)]

    @property
    def family(self) -> NoiseFamily:
        return noise_family(self.noise or LEGACY)

    @model_validator(mode="after")
    def _consistent(self) -> "SecureSumLedger":
        name = self.noise or LEGACY
        if name not in FAMILIES:
            raise ValueError(f"field 'noise' is {name!r}; expected one of {sorted(FAMILIES)}")
        family = noise_family(name)
        if self.accountant != family.accountant:
            raise ValueError(f"field 'accountant' is {self.accountant!r}; a {family.title} ledger's is "
                             f"{family.accountant!r}")
        if not self.private:
            raise ValueError("field 'private' is false, but the noise in the secure sum is a DP mechanism")
        if self.accounting is not None and self.accounting != family.accounting:
            raise ValueError(f"field 'accounting' is {self.accounting!r}; a {family.title} ledger's is "
                             f"{family.accounting!r}")
        person = self.unit == "person"
        if person and self.persons is None:
            raise ValueError("a person-level ledger lacks the field 'persons'")
        self._check_statements(family)
        for phase, plan in self.phases.items():
            if (plan.noise or family.name) != family.name:
                raise ValueError(f"phases.{phase} field 'noise' is {plan.noise!r}, the ledger's is {family.name!r}")
        entries, distinct = 0, set()
        for index, entry in enumerate(self.clients):
            where = f"clients[{index}]"
            plan = self.phases.get(entry.phase)
            if plan is None:
                raise ValueError(f"{where} names phase {entry.phase!r}, which has no plan in 'phases'")
            if (entry.records is None) != person:
                raise ValueError(f"{where} field 'records' is {entry.records!r}; a {self.unit}-level ledger's entries "
                                 + ("publish no record counts (null)" if person else "state their record counts"))
            if entry.accountant != family.accountant:
                raise ValueError(f"{where} field 'accountant' is {entry.accountant!r}; a {family.title} ledger's is "
                                 f"{family.accountant!r}")
            if entry.steps != entry.rounds_trained:  # one step (one released sum) per round the client was in
                raise ValueError(f"{where} field 'steps' is {entry.steps}, but it trained in {entry.rounds_trained} "
                                 "rounds (one released sum each)")
            entries += len(entry.history)
            if entries > MAX_ENTRIES:
                raise ValueError(f"more than {MAX_ENTRIES} history entries over all clients")
            steps = []
            for at, item in enumerate(entry.history):
                try:
                    parsed = family.parse_entry(item)
                except ValueError:
                    raise ValueError(
                        f"{where} field 'history[{at}]' must be a {family.title} entry [{', '.join(family.fields)}] "
                        f"(mu, l1, l2 > 0, 0 < sample_rate <= 1, steps >= 0), got {item!r}") from None
                distinct.add(family.entry_key(parsed))
                if len(distinct) > MAX_DISTINCT_STEPS:
                    raise ValueError(f"more than {MAX_DISTINCT_STEPS} distinct step mechanisms in the histories (a "
                                     "run has one per phase)")
                implied = family.steps(parsed.mu, parsed.l1, parsed.l2, parsed.sample_rate, parsed.steps,
                                       plan.honest, plan.dimension)
                if (parsed.shares, parsed.dimension) != (implied.shares, implied.dimension):
                    raise ValueError(f"{where} field 'history[{at}]' claims {parsed.shares} noise shares over "
                                     f"{parsed.dimension} coordinates; its phase's plan guarantees {implied.shares} "
                                     f"over {implied.dimension}")
                steps.append(parsed)
            if sum(step.steps for step in steps) != entry.rounds_trained:
                raise ValueError(f"{where} field 'history' holds {sum(step.steps for step in steps)} steps, but it "
                                 f"trained in {entry.rounds_trained} rounds")
            entry._steps = steps
        return self


    def _check_statements(self, family: NoiseFamily) -> None:
        """The sentences a ledger states are its mechanism's (privfer.privacy.mechanisms) and the trust the
        builder writes for its security and noise source: an edited statement is not the run's."""
        mechanism = MECHANISMS.get(self.mechanism_id)
        if mechanism is None or mechanism.accounting != ACCOUNTING:
            raise ValueError(f"field 'mechanism_id' is {self.mechanism_id!r}, not a mechanism of the secure sum")
        stated = mechanism.ledger_statement(noise=family.title)
        for name, value in stated.items():
            if getattr(self, name) != value:
                raise ValueError(f"field '{name}' is not what mechanism {mechanism.id!r} states")
        if self.secret_participation is not None and "secret_participation" not in stated:
            raise ValueError(f"field 'secret_participation' is not stated by mechanism {mechanism.id!r}")
        if self.trust is not None:
            security = self.trust.get("security")
            if security not in ("active", "semi_honest") or self.trust != _trust(security, self.noise_source):
                raise ValueError("field 'trust' is not what a run of its security and noise source states")


def _trust(security: str, noise_source: str) -> dict[str, str]:
    return {**_server_trust(security), **_TRUST, "noise_shares": _NOISE_SHARES.get(noise_source, noise_source)}


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
) -> SecureSumLedger:
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
        clients.append({
            "client": account.client,
            "phase": account.phase,
            # person level: how many clips a person recorded is theirs too, and enters no released quantity
            "records": None if unit == "person" else account.records,
            "rounds_trained": account.rounds_trained,
            "steps": account.rounds_trained,
            "max_rounds": max_rounds.get(account.phase, 0),
            "history": [family.entry(entry)] if account.rounds_trained else [],
            "delta": plan.delta,
            "epsilon": family.epsilon([entry], plan.delta)[0],
            "accountant": family.accountant,
        })
    spent = [c["epsilon"] for c in clients]
    document = {
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
        "trust": _trust(security, noise_source),
        "phases": {phase: plan.to_dict() for phase, plan in plans.items()},
        "public": stated["public"],
        "not_covered": list(not_covered or []),
        "epsilon_max": max(spent) if spent else None,
        "epsilon_median": statistics.median(spent) if spent else None,
        "clients": clients,
    }
    if persons is not None:
        document["persons"] = persons
    if "secret_participation" in stated:
        document["secret_participation"] = stated["secret_participation"]
    return SecureSumLedger.model_validate(document)


_TRUST = {
    "colluding_clients": "at most 'colluders' of a round's clients collude with the server (they know and can "
    "subtract their own noise shares)",
    "minimum_inputs": "clients refuse to unmask a round with fewer than 'min_inputs' included inputs, so a released "
    "sum holds at least min_inputs - colluders honest shares of variance mu / (min_inputs - colluders): at least mu",
}
_NOISE_SHARES = {
    "os": "drawn by each client from ChaCha20 keyed by 32 fresh bytes of the OS CSPRNG",
    "run_key": "drawn by each client from ChaCha20 keyed by HMAC-SHA256 of the run's secret key (drawn from the OS, "
    "kept only in the run's checkpoint)",
    "run_seed": "drawn from ChaCha20 keyed by the PUBLIC run seed: anyone holding the config can recompute every "
    "share; for reproducible experiments only, no guarantee against them",
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


__all__ = ["ACCOUNTING", "MAX_DISTINCT_STEPS", "MAX_ENTRIES", "PhasePlan", "SecureSumLedger", "SumEntry",
           "build_distributed_ledger"]
