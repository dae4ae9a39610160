"""The ledger of private hyperparameter selection (``privfer tune``): the space, every candidate, the composition.

Schema ``privfer.tuning_ledger/2`` (docs/privacy-accounting.md, "Private
hyperparameter selection"; ``/1`` ledgers, written before final runs, are still
read: they have no ``pilot_share``, ``final`` or entries' ``final``). It sits
beside the candidates' own ledgers (``candidates/NN/privacy_ledger.json``,
ordinary run ledgers), the final run's (``final/privacy_ledger.json``) and the
validation actors' ledger (``validation_ledger.json``, a secure-sum ledger of
the score releases), and binds them by SHA-256. It states:

* the declared search space and the number of candidates it declares (the
  product of its value counts), every candidate tried with its settings, its
  calibrated per-candidate budget, its run directory, its ledger's digest, its
  released validation score (each released exactly once: the tuning run
  records a release before making it and never makes one twice);
* the selection rule (argmax of the released scores: post-processing) and the
  chosen candidate;
* the candidates' share of the budget (``pilot_share``) and, when it is below 1,
  the final run: the chosen candidate's settings trained once more at the
  budget the composition leaves, with its ledger's digest;
* per training client, its epsilon composed over every candidate it trained in
  and the final run.

Validation here is structural (types, bounds, indices in order, the chosen
candidate is the argmax of the listed scores, the header restates the
entries). Whether the listed candidates are all the space declares, whether the
digests match the files and whether the composition is right is the audit's
work (:mod:`privfer.auditing.tuning`): a tampered ledger is a verdict
there, not an unreadable file.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import AfterValidator, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, \
    model_validator

from privfer.privacy.noise import FAMILIES
from privfer.privacy.ledger.base import (MAX_CLIENTS, MAX_INTEGER, Count, Delta, LedgerError, Model,
                                         Name, NonNegative, Number, Positive, Text, _between, _finite)

TUNING_SCHEMA = "privfer.tuning_ledger/2"
TUNING_SCHEMAS = ("privfer.tuning_ledger/1", TUNING_SCHEMA)  # /1: before final runs (no pilot_share, no final)
FINAL_RUN = "final"  # the final run's directory
TUNING_LEDGER_FILE = "tuning_ledger.json"
MAX_CANDIDATES = 16  # candidates one tuning run may try (each costs budget: the composition grows with them)
MAX_SPACE_KEYS = 8
MAX_VALUES = 16  # values of one key
VALIDATION_MODES = ("private", "consenting", "exact")
TUNABLE = (
    "model.hidden_size", "model.num_layers", "model.readout", "model.shortcut", "model.dropout",
    "federation.server_lr", "federation.server_optimizer", "federation.server_momentum", "federation.rounds",
    "federation.clients_per_round", "federation.local_epochs", "federation.local_lr", "federation.local_optimizer",
    "privacy.max_grad_norm", "privacy.max_update_norm", "privacy.sample_rate",
    "training.lr", "training.batch_size", "training.weight_decay",
)  # the settings a candidate may vary: the trust, the mechanism, the budget and the data are the run's
_RUN = re.compile(r"candidates/[0-9]{2}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _short_text(value: str) -> str:
    if not 1 <= len(value) <= 64:
        raise ValueError("must be 1 to 64 characters")
    return value


# A setting's value as a config holds it: a JSON scalar (numbers finite, strings short).
Scalar = Union[StrictBool, Annotated[Union[StrictInt, StrictFloat], AfterValidator(_finite)],
               Annotated[StrictStr, AfterValidator(_short_text)]]
Digest = Annotated[StrictStr, Field(pattern=_SHA256.pattern)]
Key = Literal[TUNABLE]  # type: ignore[valid-type]  # section.field, one of the settings a candidate may vary


class CandidateRecord(Model):
    """One candidate of the space: its settings, its budget, where it ran and what its score released."""

    ORDER: ClassVar[tuple[str, ...]] = ("index", "settings", "epsilon", "run", "ledger_sha256", "score")
    index: Count
    settings: Annotated[dict[Key, Scalar], Field(min_length=1, max_length=MAX_SPACE_KEYS)]
    epsilon: Positive | None  # the candidate's calibrated budget (None: trained without DP)
    run: Annotated[StrictStr, Field(pattern=r"^" + _RUN.pattern + r"$")]
    ledger_sha256: Digest
    score: Number


class FinalRecord(Model):
    """The final run: the chosen candidate's settings trained once more with the budget the candidates left."""

    ORDER: ClassVar[tuple[str, ...]] = ("settings", "epsilon", "run", "ledger_sha256")
    settings: Annotated[dict[Key, Scalar], Field(min_length=1, max_length=MAX_SPACE_KEYS)]
    epsilon: Positive
    run: Literal["final"]
    ledger_sha256: Digest


class ComposedEntry(Model):
    """A training client's epsilon composed over every candidate it trained in (and the final run)."""

    ORDER: ClassVar[tuple[str, ...]] = ("client", "phase", "candidates", "final", "epsilon")
    client: Annotated[StrictInt, _between(-MAX_INTEGER, MAX_INTEGER)]
    phase: Name
    candidates: Annotated[StrictInt, _between(0, MAX_CANDIDATES)]
    final: StrictBool | None = None  # whether it is in the final run's ledger (None: a /1 ledger)
    epsilon: NonNegative


class TuningLedger(Model):
    """The tuning ledger (module docstring)."""

    ORDER: ClassVar[tuple[str, ...]] = (
        "schema", "private", "mechanism_id", "unit", "noise", "accountant", "target_epsilon", "delta", "space",
        "candidates_declared", "pilot_share", "selection", "validation", "score", "validation_ledger",
        "validation_ledger_sha256", "not_covered", "chosen", "candidates", "final", "epsilon_max", "clients")
    schema_: Literal[TUNING_SCHEMAS] = Field(alias="schema")  # type: ignore[valid-type]
    private: StrictBool
    mechanism_id: Name | None
    unit: Name
    noise: Name | None
    accountant: Name | None
    target_epsilon: Positive | None
    delta: Delta | None
    space: Annotated[dict[Key, Annotated[list[Scalar], Field(min_length=1, max_length=MAX_VALUES)]],
                     Field(min_length=1, max_length=MAX_SPACE_KEYS)]
    candidates_declared: Annotated[StrictInt, _between(1, MAX_VALUES**MAX_SPACE_KEYS)]
    selection: Text
    validation: Literal["private", "consenting", "exact"]
    score: Text
    validation_ledger: Literal["validation_ledger.json"] | None
    validation_ledger_sha256: Digest | None
    not_covered: Annotated[list[Text], Field(max_length=64)]
    chosen: Count
    candidates: Annotated[list[CandidateRecord], Field(min_length=1, max_length=MAX_CANDIDATES)]
    pilot_share: Annotated[Number, _between(0.05, 1)] | None = None  # /2, private: set
    final: FinalRecord | None = None
    epsilon_max: NonNegative | None
    clients: Annotated[list[ComposedEntry], Field(max_length=MAX_CLIENTS, fail_fast=True)]

    @model_validator(mode="after")
    def _structure(self) -> "TuningLedger":
        declared = math.prod(len(values) for values in self.space.values())
        if declared > MAX_CANDIDATES:  # bounds the audit's work before it enumerates the space
            raise ValueError(f"field 'space' declares {declared} candidates; at most {MAX_CANDIDATES}")
        if self.noise is not None and self.noise not in FAMILIES:
            raise ValueError(f"field 'noise' is {self.noise!r}; expected one of {sorted(FAMILIES)}")
        for at, candidate in enumerate(self.candidates):
            if candidate.index != at:
                raise ValueError(f"candidates[{at}] field 'index' is {candidate.index}; candidates are listed in "
                                 "order from 0")
            if candidate.run != f"candidates/{at:02d}":
                raise ValueError(f"candidates[{at}] field 'run' is {candidate.run!r}, not 'candidates/{at:02d}'")
            if set(candidate.settings) != set(self.space):
                raise ValueError(f"candidates[{at}] field 'settings' names {sorted(candidate.settings)}, the space "
                                 f"{sorted(self.space)}")
            if (candidate.epsilon is None) == self.private:
                raise ValueError(f"candidates[{at}] field 'epsilon' is {candidate.epsilon!r}; a "
                                 f"{'private' if self.private else 'non-private'} tuning ledger's candidates "
                                 + ("state their budget" if self.private else "have none (null)"))
        if self.chosen >= len(self.candidates):
            raise ValueError(f"field 'chosen' is {self.chosen}, but {len(self.candidates)} candidates are listed")
        if self.schema_ == TUNING_SCHEMA:
            if (self.pilot_share is None) == self.private:
                raise ValueError(f"field 'pilot_share' is {self.pilot_share!r}; a "
                                 f"{'private' if self.private else 'non-private'} tuning ledger "
                                 + ("states it" if self.private else "has none (null)"))
            if (self.final is not None) != (self.private and self.pilot_share < 1):
                raise ValueError(f"field 'final' is set exactly when the candidates had a share of the budget below 1 "
                                 f"(pilot_share {self.pilot_share!r})")
            if self.final is not None and self.final.settings != self.candidates[self.chosen].settings:
                raise ValueError(f"field 'final' trains {self.final.settings}, not the chosen candidate's settings "
                                 f"{self.candidates[self.chosen].settings}")
            if any(entry.final is None for entry in self.clients):
                raise ValueError("every client entry of a /2 tuning ledger states 'final'")
            if self.final is None and any(entry.final for entry in self.clients):
                raise ValueError("client entries are in a final run the ledger does not have")
        elif self.pilot_share is not None or self.final is not None or any(e.final is not None for e in self.clients):
            raise ValueError("a privfer.tuning_ledger/1 document has no pilot_share, final or client 'final' fields")
        best = max(range(len(self.candidates)), key=lambda i: (self.candidates[i].score, -i))
        if self.chosen != best:
            raise ValueError(f"field 'chosen' is {self.chosen}, but the argmax of the released scores is {best}")
        private_fields = {"target_epsilon": self.target_epsilon, "delta": self.delta, "mechanism_id": self.mechanism_id,
                          "noise": self.noise, "accountant": self.accountant}
        for name, value in private_fields.items():
            if (value is None) == self.private:
                raise ValueError(f"field '{name}' is {value!r}; a {'private' if self.private else 'non-private'} "
                                 "tuning ledger " + ("states it" if self.private else "has none (null)"))
        if (self.validation == "private") != (self.validation_ledger is not None) or \
                (self.validation_ledger is None) != (self.validation_ledger_sha256 is None):
            raise ValueError("fields 'validation_ledger' and 'validation_ledger_sha256' are set exactly when "
                             "'validation' is 'private'")
        if (self.validation == "exact") == self.private:
            raise ValueError(f"field 'validation' is {self.validation!r}: exact scores belong to a non-private run, "
                             "a private run's are 'private' or 'consenting'")
        if not self.private and self.clients:
            raise ValueError("a non-private tuning ledger has no client entries")
        spent = [entry.epsilon for entry in self.clients]
        expected = max(spent) if spent else None
        if (self.epsilon_max is None) != (expected is None) or (
                expected is not None and not math.isclose(self.epsilon_max, expected, rel_tol=1e-9, abs_tol=1e-12)):
            raise ValueError(f"field 'epsilon_max' is {self.epsilon_max!r}, but the entries' epsilons give "
                             f"{expected!r}")
        return self

    def document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def parse_tuning_ledger(document: Any, path: Path | str = TUNING_LEDGER_FILE) -> TuningLedger:
    """Validate a parsed document; LedgerError naming the file and the first bad field."""
    try:
        return TuningLedger.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "the document"
        raise LedgerError(f"{path}: {where}: {error['msg']}") from None


def read_tuning_ledger(path: Path | str) -> TuningLedger:
    """Read and validate a tuning ledger (a tuning run directory is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / TUNING_LEDGER_FILE
    from privfer.privacy.ledger.document import read_json_document

    return parse_tuning_ledger(read_json_document(path, "a finished privfer tune run writes it"), path)


__all__ = ["MAX_CANDIDATES", "MAX_SPACE_KEYS", "MAX_VALUES", "TUNABLE", "TUNING_LEDGER_FILE", "TUNING_SCHEMA",
           "TUNING_SCHEMAS", "VALIDATION_MODES", "FINAL_RUN", "CandidateRecord", "ComposedEntry", "FinalRecord",
           "TuningLedger", "parse_tuning_ledger", "read_tuning_ledger"]
