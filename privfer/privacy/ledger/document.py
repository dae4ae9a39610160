"""Reading and writing privacy ledgers: the one place a ledger document becomes a typed model, and back.

:func:`parse_ledger` picks the model by the ledger's ``mechanism_id`` (its
mechanism's accounting, :mod:`privfer.privacy.mechanisms`), validates the
document with it and holds the unit to the mechanism's; every failure is one
:class:`LedgerError` naming the file and the field. :func:`read_ledger` bounds
the file before it reads it; :func:`write_ledger` writes a validated model
atomically. Nothing is added to a document read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from pydantic import ValidationError

from privfer.privacy.ledger.base import LEGACY_SCHEMAS, MAX_CLIENTS, MAX_LEDGER_BYTES, SCHEMA, LedgerBase, LedgerError
from privfer.privacy.ledger.opacus import OpacusLedger
from privfer.privacy.ledger.secure_sum import SecureSumLedger
from privfer.privacy.mechanisms import MECHANISMS
from privfer.privacy.mechanisms.local import MECHANISM as _LOCAL
from privfer.runs import atomic_write_json

LOCAL = _LOCAL.id  # the mechanism id of a ledger of Opacus histories: local DP-SGD, and runs without DP
Ledger = Union[OpacusLedger, SecureSumLedger]
MODELS: dict[str, type[LedgerBase]] = {model.ACCOUNTING: model for model in (OpacusLedger, SecureSumLedger)}
LEDGER_FILE = "privacy_ledger.json"
_HISTORY_FORMAT = {OpacusLedger: "[noise_multiplier > 0, 0 < sample_rate <= 1, steps >= 0]"}


def ledger_file(path: Path | str) -> Path:
    """The ledger file of ``path``: the file itself, or a run directory's privacy_ledger.json."""
    path = Path(path)
    return path / LEDGER_FILE if path.is_dir() else path


def mechanism_of(ledger: LedgerBase | dict[str, Any]) -> str:
    """A ledger's mechanism id (a legacy ledger has none: it is local)."""
    found = ledger.get("mechanism_id") if isinstance(ledger, dict) else ledger.mechanism_id
    return LOCAL if found is None else found


def parse_ledger(document: Any, path: Path | str = LEDGER_FILE) -> Ledger:
    """``document`` (a parsed JSON object, or a ledger already validated) as its mechanism's typed ledger;
    LedgerError naming ``path`` and the field otherwise."""
    if isinstance(document, LedgerBase):
        return document  # type: ignore[return-value]
    path = Path(path)
    if not isinstance(document, dict):
        raise LedgerError(f"{path}: the ledger must be a JSON object")
    schema = document.get("schema")
    if "schema" not in document:
        raise LedgerError(f"{path}: the ledger lacks the field 'schema'")
    if schema != SCHEMA and schema not in LEGACY_SCHEMAS:
        raise LedgerError(f"{path}: field 'schema' is {_short(schema)}; this privfer reads {SCHEMA!r}")
    if schema in LEGACY_SCHEMAS:
        if "mechanism_id" in document:
            raise LedgerError(f"{path}: field 'mechanism_id' is in a {schema} ledger, which predates it (every {schema} "
                              f"ledger is local DP-SGD); this privfer writes {SCHEMA!r}")
        mechanism_id: Any = LOCAL
    elif "mechanism_id" not in document:
        raise LedgerError(f"{path}: the ledger lacks the field 'mechanism_id'")
    else:
        mechanism_id = document["mechanism_id"]
    # a run without DP protects nothing: its (local) ledger states the configured unit
    mechanism = MECHANISMS.get(mechanism_id) if isinstance(mechanism_id, str) else None
    if mechanism is None:
        raise LedgerError(f"{path}: field 'mechanism_id' is {_short(mechanism_id)}; expected one of "
                          f"{sorted(MECHANISMS)}")
    unit = document.get("unit")
    if document.get("private") is True and isinstance(unit, str) and unit != mechanism.unit:  # before the entries
        raise LedgerError(f"{path}: field 'unit' is {_short(unit)}, but mechanism_id {mechanism.id!r} protects a "
                          f"{mechanism.unit}")
    clients = document.get("clients")
    if isinstance(clients, list) and len(clients) > MAX_CLIENTS:  # bounded before any entry is validated
        raise LedgerError(f"{path}: {len(clients)} client entries; at most {MAX_CLIENTS} are audited")
    model = MODELS[mechanism.accounting]
    try:
        ledger = model.model_validate(document)
    except ValidationError as exc:
        raise LedgerError(_message(exc, document, path, model)) from None
    except (ArithmeticError, RecursionError) as exc:  # a validator's arithmetic on a hostile value
        raise LedgerError(f"{path}: a value cannot be evaluated ({exc.__class__.__name__})") from None
    return ledger  # type: ignore[return-value]


def read_ledger(path: Path | str) -> Ledger:
    """Read and validate a ledger file (a run directory is accepted too); LedgerError names file and field."""
    path = ledger_file(path)
    return parse_ledger(read_json_document(path, "a finished privfer simulate run writes it"), path)


def read_json_document(path: Path, written_by: str) -> Any:
    """The JSON document of a ledger file: a regular file of at most MAX_LEDGER_BYTES, no key twice in an object;
    LedgerError naming the file otherwise (``written_by``: what writes it, for a missing file)."""
    if not path.is_file():
        raise LedgerError(f"{path} does not exist ({written_by})")
    if path.stat().st_size > MAX_LEDGER_BYTES:
        raise LedgerError(f"{path} is {path.stat().st_size} bytes; ledgers of at most {MAX_LEDGER_BYTES} are read")
    try:
        document = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise LedgerError(f"{path}: the key {_short(exc.args[0])} appears twice in one object (which one counts "
                          "would depend on the reader)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise LedgerError(f"{path} is not readable JSON ({exc.__class__.__name__})") from None
    return document


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return document


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message never echoes a hostile field whole."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_ledger(path: Path, ledger: LedgerBase) -> None:
    """Write a validated ledger atomically (its document, in the writer's field order)."""
    if not isinstance(ledger, LedgerBase):
        raise TypeError(f"write_ledger takes a validated ledger model, not {type(ledger).__name__}")
    atomic_write_json(path, ledger.document())


_PHRASES = {
    "missing": None,  # handled apart: "lacks the field"
    "int_type": "must be a whole number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "tuple_type": "must be a list",
    "extra_forbidden": "is not a field of this ledger schema",
}


def _message(exc: ValidationError, document: dict, path: Path, model: type[LedgerBase]) -> str:
    """The first validation error as one line: the file, where (the ledger, clients[i], phases.p), the field."""
    errors = exc.errors(include_url=False)
    error = errors[0]
    loc = _location(document, tuple(error["loc"]), error["type"] == "missing")
    kinds = {e["type"] for e in errors if _location(document, tuple(e["loc"]), False) == loc}
    where, rest, value = "the ledger", list(loc), document
    if len(rest) >= 2 and rest[0] in ("clients", "phases"):
        where = f"clients[{rest[1]}]" if rest[0] == "clients" else f"phases.{rest[1]}"
        value = _at(document, rest[:2])
        rest = rest[2:]
    if rest and rest[0] == "history" and len(rest) >= 2:  # a history entry is judged whole, as its format
        field, value = f"history[{rest[1]}]", _at(value, rest[:2])
        text = _HISTORY_FORMAT.get(model, "a history entry of the ledger's noise family")
        return f"{path}: {where} field '{field}' must be {text}, got {_short(value)}"
    field = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(rest))
    if error["type"] == "missing":
        return f"{path}: {where} lacks the field '{field}'"
    message = str(error["msg"]).removeprefix("Value error, ")
    if not field:  # a check of the whole section
        return f"{path}: {message}" if where == "the ledger" else f"{path}: {where}: {message}"
    phrase = _phrase(kinds, error)
    shown = _at(value, rest)
    return f"{path}: {where} field '{_short(field, 200)[1:-1]}' {phrase}, got {_short(shown)}"


def _phrase(kinds: set[str], error: dict) -> str:
    """How a field fails, in words, from the error types pydantic reported at its place (``kinds``)."""
    if "finite_number" in kinds:
        return "must be a finite number"
    if kinds >= {"int_type", "float_type"}:  # a JSON number is an int or a float: a value failing both is neither
        return "must be a number"
    return _PHRASES.get(error["type"]) or str(error["msg"]).removeprefix("Value error, ")


def _location(document: Any, loc: tuple, missing: bool) -> list:
    """``loc`` without the union and validator tags pydantic adds: the keys and indices that lead into
    ``document`` (and, for a missing field, its name)."""
    clean: list = []
    value = document
    for at, part in enumerate(loc):
        if isinstance(value, dict) and isinstance(part, str) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        elif missing and at == len(loc) - 1 and isinstance(part, str):
            pass  # the missing field's name
        else:
            continue
        clean.append(part)
    return clean


def _at(value: Any, loc: list) -> Any:
    for part in loc:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return None
    return value


__all__ = ["LEDGER_FILE", "LOCAL", "MODELS", "Ledger", "ledger_file", "mechanism_of",
           "parse_ledger", "read_ledger", "write_ledger"]
