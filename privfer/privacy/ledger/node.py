"""A node's lifetime ledger, typed: schema ``privfer.node_ledger/1`` (the file :mod:`privfer.privacy.node_ledger`
keeps on a node's own disk).

The same strictness as the run ledger (:mod:`.base`): JSON numbers only, finite, integers within 2^53, every field
the writer writes required, unknown fields refused, duplicate keys refused. It holds the unit, its mechanism, the
noise family, delta and the pinned lifetime budget; the rounds the node took part in; the history of step
mechanisms in the family's entry format (rounds of one plan merge into one entry, at most
:data:`MAX_NODE_ENTRIES`); and, past that many distinct plans, the rounds folded into one composed RDP vector.
A file written before the ``noise`` field existed is read as the legacy family's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, StrictInt, StrictStr, ValidationError, model_validator

from privfer.config import MAX_EPSILON
from privfer.privacy.ledger.base import (MAX_INTEGER, Count, Delta, Model, Name, NonNegative, Number, Positive,
                                         _between)
from privfer.privacy.mechanisms import UNITS as UNIT_NAMES
from privfer.privacy.mechanisms import select
from privfer.privacy.noise import LEGACY, NoiseSteps, noise_family
from privfer.privacy.rdp import ORDERS

NODE_SCHEMA = "privfer.node_ledger/1"
MAX_NODE_ENTRIES = 1024  # itemized step mechanisms; rounds of further plans are folded
DISTRIBUTED = "distributed"  # the privacy.mechanism a node's rounds run (the noise is in the secure sum)
MAX_PLAN_VALUE = 1e100  # mu, l1, l2 of a history entry: far above any plan a node accepts, below float overflow


class UnreadableLedger(ValueError):
    """The file is not JSON a reader can take (syntax, nesting, a number no float holds, bad text)."""


class Folded(Model):
    """Rounds of plans past the itemized limit, as one composed RDP vector over the accountant's orders."""

    ORDER: ClassVar[tuple[str, ...]] = ("orders", "rdp", "rounds")

    orders: Annotated[list[Number], Field(max_length=len(ORDERS))]
    rdp: Annotated[list[NonNegative], Field(max_length=len(ORDERS))]
    rounds: Annotated[StrictInt, _between(1, MAX_INTEGER)]

    @model_validator(mode="after")
    def _orders(self) -> "Folded":
        if self.orders != list(ORDERS) or len(self.rdp) != len(ORDERS):
            raise ValueError(f"must hold this accountant's {len(ORDERS)} orders and one RDP value per order")
        return self


class NodeLedgerRecord(Model):
    """The node ledger's document (see the module docstring)."""

    ORDER: ClassVar[tuple[str, ...]] = ("schema", "unit", "mechanism_id", "noise", "delta", "lifetime_epsilon",
                                        "rounds", "epsilon", "history", "last", "folded")

    schema_: Literal["privfer.node_ledger/1"] = Field(alias="schema")
    unit: Literal[UNIT_NAMES]  # type: ignore[valid-type]
    mechanism_id: Name
    noise: Name = LEGACY  # absent in a ledger written before the field existed: that family's
    delta: Delta
    lifetime_epsilon: Annotated[Positive, _between(0, MAX_EPSILON, open_low=True)]
    rounds: Count
    epsilon: NonNegative
    history: Annotated[list[list[Number]], Field(max_length=MAX_NODE_ENTRIES)]
    last: Annotated[list[Union[Annotated[StrictStr, Field(max_length=1024)], Number]],
                    Field(max_length=2)]  # [round id, unix time]; [] when fresh
    folded: Folded | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "NodeLedgerRecord":
        if self.mechanism_id != select(DISTRIBUTED, self.unit).id:
            raise ValueError(f"field 'mechanism_id' is {self.mechanism_id!r}; a {self.unit}-level node's is "
                             f"{select(DISTRIBUTED, self.unit).id!r}")
        try:
            family = noise_family(self.noise)
        except (KeyError, ValueError):
            raise ValueError(f"field 'noise' names no known noise family: {self.noise!r}") from None
        for index, item in enumerate(self.history):
            try:
                step = family.parse_entry(item)
            except ValueError:
                raise ValueError(f"field 'history[{index}]' is not [{', '.join(family.fields)}]") from None
            # every entry is written by a round (steps >= 1); its numbers within what a plan can hold, so the
            # accountant's arithmetic cannot overflow
            if step.steps < 1 or not all(0 < value <= MAX_PLAN_VALUE for value in (step.mu, step.l1, step.l2)):
                raise ValueError(f"field 'history[{index}]' must have steps >= 1 and mu, l1, l2 in (0, "
                                 f"{MAX_PLAN_VALUE:g}]")
        if self.folded is not None and self.folded.rounds > self.rounds:
            raise ValueError(f"field 'folded' holds {self.folded.rounds} rounds, more than the ledger's "
                             f"{self.rounds}")
        return self

    def document(self) -> dict[str, Any]:
        """The JSON document, in the writer's field order (``folded`` only once rounds were folded)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def entries(self) -> list[NoiseSteps]:
        family = noise_family(self.noise)
        return [family.parse_entry(item) for item in self.history]

    def folded_rdp(self) -> list[float] | None:
        return None if self.folded is None else [float(x) for x in self.folded.rdp]


def parse_node_ledger(text: str, where: str) -> NodeLedgerRecord:
    """A node ledger's text, validated; ValueError whose message names ``where`` and the field."""
    from privfer.privacy.ledger.document import _DuplicateKey, _no_duplicates, _short

    try:
        document = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise ValueError(f"{where}: the key {_short(exc.args[0])} appears twice in one object") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, a 5000-digit integer, deep nesting
        raise UnreadableLedger(f"{where} cannot be read ({exc.__class__.__name__})") from None
    if not isinstance(document, dict) or document.get("schema") != NODE_SCHEMA:
        raise ValueError(f"{where} is not a {NODE_SCHEMA} file")
    try:
        return NodeLedgerRecord.model_validate(document)
    except ValidationError as exc:
        raise ValueError(_first_error(exc, document, where)) from None


def _first_error(exc: ValidationError, document: dict, where: str) -> str:
    """The first validation error as one line naming the field (a history entry or the folded section whole)."""
    from privfer.privacy.ledger.document import _at, _phrase, _short

    errors = exc.errors(include_url=False)
    error = errors[0]
    loc = [part for part in error["loc"] if isinstance(part, (str, int))]
    kinds = {e["type"] for e in errors if e["loc"][:1] == error["loc"][:1]}
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{where} lacks the field '{loc[0] if loc else '?'}'"
    if not loc:  # a check of the whole ledger: its message names the field
        return f"{where}: {message}"
    loc = loc[:2] if loc[0] == "history" and len(loc) > 1 else loc[:1]
    field = f"history[{loc[1]}]" if len(loc) == 2 else str(loc[0])
    phrase = _phrase(kinds, error)
    if loc[0] == "last":
        phrase = "must be [the round id (at most 1024 characters), the time]"
    return f"{where} field '{field}' {phrase}, got {_short(_at(document, loc))}"


def fresh_node_ledger(unit: str, mechanism_id: str, noise: str, delta: float,
                      lifetime_epsilon: float) -> NodeLedgerRecord:
    """The ledger of a node that has not taken part in any round."""
    return NodeLedgerRecord.model_validate({
        "schema": NODE_SCHEMA, "unit": unit, "mechanism_id": mechanism_id, "noise": noise, "delta": delta,
        "lifetime_epsilon": lifetime_epsilon, "rounds": 0, "epsilon": 0.0, "history": [], "last": []})


def node_ledger_from(document: dict[str, Any], where: str | Path) -> NodeLedgerRecord:
    """A document the node built (its next state), validated before it is written."""
    try:
        return NodeLedgerRecord.model_validate(document)
    except ValidationError as exc:
        raise ValueError(_first_error(exc, document, str(where))) from None


__all__ = ["MAX_NODE_ENTRIES", "MAX_PLAN_VALUE", "NODE_SCHEMA", "UnreadableLedger", "Folded", "NodeLedgerRecord", "fresh_node_ledger", "node_ledger_from",
           "parse_node_ledger"]
