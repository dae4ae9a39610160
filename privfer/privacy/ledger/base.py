"""What every privacy ledger holds, typed: the run-level header, the entry fields every mechanism shares, the bounds.

A ledger is a pydantic model (:class:`LedgerBase`); each accounting — an Opacus
history per client (:mod:`privfer.privacy.ledger.opacus`), the noise in the
secure sum (:mod:`privfer.privacy.ledger.secure_sum`) — subclasses it with its
own entry type and run-level sections. Validation is strict: numbers are JSON
numbers (never booleans or strings) and finite, counts are integers, every
field the writer writes is required, and a field the model does not know is
refused, so a ledger that passes validation is one the audit can read without
another check. :mod:`privfer.privacy.ledger.document` reads and writes them.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      model_serializer, model_validator)

from privfer.errors import PrivferError

SCHEMA = "privfer.privacy_ledger/2"
LEGACY_SCHEMAS = ("privfer.privacy_ledger/1",)  # local ledgers written before mechanism_id existed
MAX_HISTORY = 64  # items in one entry's history: a run writes one per client and phase (rounds of one plan merge);
# each distinct item costs the tight accountants about a second, so a longer history is refused before any runs
MAX_CLIENTS = 1_000_000
MAX_LEDGER_BYTES = 256 << 20  # a larger file is refused before it is read


class LedgerError(PrivferError):
    """A privacy ledger is missing, unreadable, or lacks a field; the message names the file and the field."""


MAX_INTEGER = 2**53  # a JSON number a float holds exactly; larger integers are refused (no float overflows later)


def _finite(value: float) -> float:
    if isinstance(value, int):
        if abs(value) > MAX_INTEGER:
            raise ValueError(f"must be at most {MAX_INTEGER} in magnitude")
    elif not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _between(low: float | None, high: float | None, *, open_low: bool = False, open_high: bool = False):
    """An AfterValidator holding a number to a range; its message names the range."""
    left, right = "(" if open_low else "[", ")" if open_high else "]"
    text = f"must be in {left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"

    def check(value: float) -> float:
        if low is not None and (value < low or (open_low and value == low)):
            raise ValueError(text)
        if high is not None and (value > high or (open_high and value == high)):
            raise ValueError(text)
        return value

    return AfterValidator(check)


# A JSON number, kept as written (an int stays an int, so a ledger read and written again is the same file).
Number = Annotated[Union[StrictInt, StrictFloat], AfterValidator(_finite)]
Positive = Annotated[Number, _between(0, None, open_low=True)]
NonNegative = Annotated[Number, _between(0, None)]
Rate = Annotated[Number, _between(0, 1, open_low=True)]  # a sample rate: (0, 1]
Delta = Annotated[Number, _between(0, 1, open_low=True, open_high=True)]
Count = Annotated[StrictInt, _between(0, MAX_INTEGER)]
Text = Annotated[StrictStr, Field(min_length=1, max_length=10_000)]  # a sentence: never empty, bounded
Name = Annotated[StrictStr, Field(min_length=1, max_length=64)]  # a phase, a unit, an accountant, ...
Accountant = Literal["rdp", "prv"]  # an Opacus accountant
NoiseSource = Literal["os", "run_key", "run_seed"]


class Model(BaseModel):
    """Strict, closed and frozen: the base of every ledger section. :attr:`ORDER` is the order the writer puts its
    fields in (JSON names; a field not set is left out)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)
    ORDER: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _in_order(self, handler: Any) -> dict[str, Any]:
        raw = handler(self)
        return {name: raw[name] for name in self.ORDER if name in raw} if self.ORDER else raw


class EntryBase(Model):
    """The fields of a client's entry every mechanism writes: who, which phase, how often it trained, its delta and
    the epsilon the ledger claims for it."""

    client: Annotated[StrictInt, _between(-MAX_INTEGER, MAX_INTEGER)]
    phase: Name
    rounds_trained: Count
    steps: Count
    max_rounds: Count
    delta: Delta


class LedgerBase(Model):
    """The run-level fields of every ledger (docs/privacy-accounting.md, "The ledger"). Subclasses add the entry
    type (``clients``) and their sections."""

    ACCOUNTING: ClassVar[str]

    schema_: Name = Field(alias="schema")
    mechanism_id: Name = None  # type: ignore[assignment]  # absent only in a legacy (/1) ledger; never null
    unit: Name
    mechanism: Text
    private: StrictBool
    accountant: Name
    target_epsilon: Positive | None
    delta: Delta
    max_grad_norm: Positive
    noise_source: NoiseSource
    neighbouring_relation: Text
    public: Annotated[list[Text], Field(max_length=64)]
    not_covered: Annotated[list[Text], Field(max_length=64)]
    epsilon_max: NonNegative | None
    epsilon_median: NonNegative | None

    def document(self) -> dict[str, Any]:
        """The JSON document (the writer's field order; a section this ledger does not have is left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    @model_validator(mode="after")
    def _header_agrees(self) -> "LedgerBase":
        """Every accounting's header restates its entries: one delta for every entry, and the largest and median
        epsilon of the entries."""
        entries = self.clients  # type: ignore[attr-defined]
        for index, entry in enumerate(entries):
            if not math.isclose(entry.delta, self.delta, rel_tol=1e-12):
                raise ValueError(f"clients[{index}] field 'delta' is {entry.delta!r}, but the ledger's delta is "
                                 f"{self.delta!r} (a run accounts every client at one delta)")
        spent = sorted(e.epsilon for e in entries if e.epsilon is not None)
        expected = {"epsilon_max": spent[-1] if spent else None,
                    "epsilon_median": (spent[(len(spent) - 1) // 2] + spent[len(spent) // 2]) / 2 if spent else None}
        for name, value in expected.items():
            stated = getattr(self, name)
            if (stated is None) != (value is None) or (
                    value is not None and not math.isclose(stated, value, rel_tol=1e-9, abs_tol=1e-12)):
                raise ValueError(f"field '{name}' is {stated!r}, but the entries' epsilons give {value!r}")
        return self


__all__ = ["LEGACY_SCHEMAS", "MAX_CLIENTS", "MAX_HISTORY", "MAX_INTEGER", "MAX_LEDGER_BYTES", "SCHEMA", "Accountant",
           "Count", "Delta", "EntryBase", "LedgerBase", "LedgerError", "Model", "NoiseSource", "NonNegative", "Number",
           "Name", "Positive", "Rate", "Text"]
