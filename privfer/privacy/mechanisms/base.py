"""What a privacy mechanism is, torch-free: the facts every layer reads from one place.

A :class:`PrivacyMechanism` is registered by one file under this package (``__init__.py`` lists the files). It
names the ledger's ``mechanism_id`` and the unit it protects, how a config selects it, its own settings
(``privacy.options``, validated by its ``Options`` model), the aggregation backends it needs, whether clients train locally, which accounting its ledger holds (the audit picks its auditor by it), the
sentences its ledger states, and how a distributed plan's clipping bound, sample rate and sum bound follow from
the unit. The trainers (``privfer/fl/mechanisms/``), the ledger, the audit, the Flower node and the CLI read
these facts; none of them spells a mechanism's id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict

UNITS = ("record", "person")
ACCOUNTINGS = ("opacus", "secure_sum")  # an Opacus history per client / the noise family's RDP of the secure sum


class NoOptions(BaseModel):
    """A mechanism without options of its own (``privacy.options`` must be empty)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class PlanInputs:
    """The unit-dependent inputs of a distributed plan's calibration."""

    max_grad_norm: float  # what one unit moves the sum by (a record's clipped gradient, a person's clipped update)
    sample_rate: float  # a unit's chance to be in a round's sum (Poisson records, a person's secret coin)
    records: int  # the units the sum's bound counts


@dataclass(frozen=True)
class PrivacyMechanism:
    """One privacy mechanism's facts (see the module docstring)."""

    id: str  # the ledger's mechanism_id
    unit: str  # what one neighbouring change adds or removes: "record" or "person"
    selected_by: str  # the privacy.mechanism value that selects it, with privacy.unit == unit
    title: str  # in sentences and the run summary
    accounting: str  # see ACCOUNTINGS
    takes_local_steps: bool  # False: one step on the global model per round (no client training)
    per_sample_gradients: bool  # it clips each example's gradient (False: a person's whole update)
    backends: tuple[str, ...] | None = None  # aggregation backends it runs on; None: any
    counted: str = "records"  # what its delta is judged against, in messages ("records", "persons")
    statement: Mapping[str, Any] = field(default_factory=dict)  # the ledger's mechanism, relation, public, ...
    # its own settings: ``privacy.options``, validated by this model when the config is loaded (the config knows
    # only the section's name; a new mechanism's settings are written here, not in privfer/config)
    Options: type[BaseModel] = NoOptions

    def __post_init__(self) -> None:
        if self.unit not in UNITS or self.accounting not in ACCOUNTINGS:
            raise ValueError(f"mechanism {self.id!r}: unit must be one of {UNITS} and accounting one of "
                             f"{ACCOUNTINGS}")
        if not {"mechanism", "neighbouring_relation", "public"} <= set(self.statement):
            raise ValueError(f"mechanism {self.id!r}: its statement needs 'mechanism', 'neighbouring_relation' and "
                             "'public'")

    @property
    def noise_in_sum(self) -> bool:
        """Its ledger holds each phase's plan of the noise in the secure sum."""
        return self.accounting == "secure_sum"

    def plan_inputs(self, *, max_grad_norm: float, sample_rate: float, max_update_norm: float,
                    participation: float, clients: int, records: int) -> PlanInputs:
        """A distributed plan's clipping bound, sample rate and counted units for this unit: a record's clipped
        gradient, Poisson-sampled, with the sum bounding ``records``; or a person's clipped update, by its secret
        coin, with the sum bounding the round's ``clients``."""
        if self.unit == "person":
            return PlanInputs(max_update_norm, participation, clients)
        return PlanInputs(max_grad_norm, sample_rate, records)

    def ledger_statement(self, **names: str) -> dict[str, Any]:
        """The ledger's sentences (fresh lists: a ledger may be edited), with ``{noise}`` and the like filled in."""
        def fill(value: Any) -> Any:
            return value.format(**names) if isinstance(value, str) else [fill(item) for item in value]

        return {key: fill(value) for key, value in self.statement.items()}


__all__ = ["ACCOUNTINGS", "UNITS", "NoOptions", "PlanInputs", "PrivacyMechanism"]
