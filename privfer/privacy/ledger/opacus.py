"""The ledger of local DP-SGD (and of a run without DP, which says so): per client, its Opacus accountant history.

An entry holds the client's record count, noise multiplier, sample rate,
steps, rounds trained, the history ``[[noise_multiplier, sample_rate, steps],
...]`` in training order, delta, and the epsilon the named accountant gives.
"""

from __future__ import annotations

import statistics
from typing import Annotated, Any, ClassVar

from pydantic import Field, model_validator

from privfer.privacy.ledger.accounts import ClientAccount
from privfer.privacy.ledger.base import (MAX_CLIENTS, MAX_HISTORY, SCHEMA, Accountant, Count, EntryBase, LedgerBase,
                                         NonNegative, Positive, Rate)
from privfer.privacy.mechanisms.local import MECHANISM as LOCAL_MECHANISM

ACCOUNTING = "opacus"
NO_DP_MECHANISM = "none: trained without DP ({trained_by}); no noise, so no epsilon"
NO_DP_RELATION = "none: a run without DP protects no record and no person"
# how a run without DP trained, by line and unit: the only words its ledger may use
TRAINED_LOCALLY = "FedAvg of the clients' local epochs, no clipping"
TRAINED_BY_DPSGD = ("distributed DP-SGD's steps with no noise share: clipped per-record gradient sums through the "
                    "secure sum")
TRAINED_BY_DPFEDAVG = "distributed DP-FedAvg's rounds with no noise share: clipped whole updates through the secure sum"
NO_DP_SENTENCES = {NO_DP_MECHANISM.format(trained_by=how): how
                   for how in (TRAINED_LOCALLY, TRAINED_BY_DPSGD, TRAINED_BY_DPFEDAVG)}
OpacusStep = tuple[Positive, Rate, Count]  # (noise multiplier, sample rate, steps): one Opacus history entry


class OpacusEntry(EntryBase):
    """One client's accounting within one phase: its Opacus history and the epsilon claimed for it."""

    ORDER: ClassVar[tuple[str, ...]] = ("client", "phase", "records", "noise_multiplier", "sample_rate", "history",
                                        "rounds_trained", "steps", "max_rounds", "delta", "epsilon", "accountant")

    records: Count
    noise_multiplier: Positive | None  # None: trained without DP
    sample_rate: Rate
    history: Annotated[list[OpacusStep], Field(max_length=MAX_HISTORY, fail_fast=True)]
    epsilon: NonNegative | None
    accountant: Accountant  # the run's, or rdp where PRV could not evaluate the history


class OpacusLedger(LedgerBase):
    """A local DP-SGD ledger (mechanism ``local``; a legacy ``/1`` ledger is one without ``mechanism_id``)."""

    ACCOUNTING: ClassVar[str] = ACCOUNTING
    ORDER: ClassVar[tuple[str, ...]] = (
        "schema", "mechanism_id", "unit", "mechanism", "private", "accountant", "target_epsilon", "delta",
        "max_grad_norm", "noise_source", "neighbouring_relation", "public", "not_covered", "epsilon_max",
        "epsilon_median", "clients")
    accountant: Accountant
    clients: Annotated[list[OpacusEntry], Field(max_length=MAX_CLIENTS, fail_fast=True)]

    @model_validator(mode="after")
    def _consistent(self) -> "OpacusLedger":
        stated = LOCAL_MECHANISM.ledger_statement()
        if self.private or self.mechanism == stated["mechanism"]:  # with DP (or a run without DP written before
            # its ledger said so), the sentences are the mechanism's
            for name, value in stated.items():
                if getattr(self, name) != value:
                    raise ValueError(f"field '{name}' is not what mechanism {LOCAL_MECHANISM.id!r} states")
        else:  # without DP: it says how the run trained, and that nothing is protected
            if self.mechanism not in NO_DP_SENTENCES:
                raise ValueError("field 'mechanism' of a ledger without DP must say how it trained, in one of "
                                 f"privfer's sentences: {sorted(NO_DP_SENTENCES)}")
            if self.neighbouring_relation != NO_DP_RELATION:
                raise ValueError(f"field 'neighbouring_relation' of a ledger without DP must be {NO_DP_RELATION!r}")
            if self.public != stated["public"]:
                raise ValueError(f"field 'public' is not what mechanism {LOCAL_MECHANISM.id!r} states")
        for index, entry in enumerate(self.clients):
            where = f"clients[{index}]"
            if self.private and not entry.history and entry.rounds_trained:
                raise ValueError(f"{where} trained but its field 'history' is empty")
            if not self.private and (entry.noise_multiplier is not None or entry.epsilon is not None):
                raise ValueError(f"{where} states a noise multiplier or an epsilon in a ledger without DP")
            if self.private and (entry.noise_multiplier is None or entry.epsilon is None):
                raise ValueError(f"{where} lacks its noise multiplier or its epsilon in a ledger with DP")
        return self


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
    trained_by: str | None = None,
) -> OpacusLedger:
    """The ledger with each client's epsilon computed by ``accountant`` (``unit``: the configured one; without DP
    it is only stated). Without DP (``target_epsilon`` None) the ledger's sentences say so and ``trained_by`` says
    how the run trained."""
    if (target_epsilon is None) != (trained_by is not None):
        raise ValueError("a ledger without DP says how the run trained (trained_by); a private one does not")
    if trained_by is not None and trained_by not in NO_DP_SENTENCES.values():
        raise ValueError(f"trained_by must be one of {sorted(NO_DP_SENTENCES.values())}, got {trained_by!r}")
    clients: list[dict[str, Any]] = []
    for account in sorted(accounts, key=lambda a: (a.phase, a.client)):
        epsilon, used = account.epsilon(delta, accountant)
        clients.append({**account.to_state(), "steps": account.steps, "max_rounds": max_rounds.get(account.phase, 0),
                        "delta": delta, "epsilon": epsilon, "accountant": used})
    spent = [c["epsilon"] for c in clients if c["epsilon"] is not None]
    stated = LOCAL_MECHANISM.ledger_statement()
    if trained_by is not None:
        stated.update(mechanism=NO_DP_MECHANISM.format(trained_by=trained_by), neighbouring_relation=NO_DP_RELATION)
    return OpacusLedger.model_validate({
        "schema": SCHEMA,
        "mechanism_id": LOCAL_MECHANISM.id,
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
    })


__all__ = ["ACCOUNTING", "NO_DP_MECHANISM", "NO_DP_RELATION", "NO_DP_SENTENCES", "TRAINED_BY_DPFEDAVG",
           "TRAINED_BY_DPSGD", "TRAINED_LOCALLY", "OpacusEntry", "OpacusLedger", "OpacusStep", "build_ledger"]
