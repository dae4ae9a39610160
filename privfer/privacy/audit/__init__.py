"""Theoretical privacy audit of a run: every client's epsilon recomputed by independent accountants.

Reads a run's ``privacy_ledger.json`` (docs/privacy-accounting.md), checks it
with the auditor of its ``mechanism_id`` (:data:`KINDS`, one per mechanism:
the unit it protects, how its entries are checked on load, how its epsilons
are recomputed — :mod:`privfer.privacy.audit.local` for Opacus histories,
:mod:`privfer.privacy.audit.distributed` for the noise in the secure sum).
This package is the ledger alone, torch-free; :mod:`privfer.auditing` (a layer
above the trainers) also holds the ledger to the run directory that wrote it.

Local DP-SGD: four accountants, all sound upper bounds on the true epsilon of
the Poisson-subsampled Gaussian mechanism (Opacus RDP and PRV, dp-accounting
RDP and PLD; RDP by its conversion, PRV and PLD up to their stated
discretization error, which their upper estimates include). Verdicts:

* ``OVER BUDGET`` — no sound bound certifies the target: the smallest of the
  four exceeds the target epsilon (RDP alone exceeding it is expected for a
  PRV-calibrated run: RDP is looser by design), or the ledger's own claimed
  epsilon exceeds it.
* ``MISMATCH`` — the numbers disagree beyond what the methods explain: the
  claimed epsilon differs from the ledger accountant's recomputation by more
  than 0.01 + 1%; the two RDP implementations by more than 3% (different order
  grids); PRV and PLD (both near-exact) by more than 0.05 + 3%; an RDP value
  below PLD by more than 0.05 + 3% (RDP cannot be tighter than the exact
  epsilon); or the entry's fields contradict its history (noise multiplier,
  sample rate, steps).
* ``WEAK DELTA`` — delta >= 1 / records: a mechanism that publishes one random
  record outright would satisfy it.
* ``NO DP`` — the run trained without DP-SGD; there is no epsilon to certify.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from privfer.privacy.audit.distributed import DISTRIBUTED_ACCOUNTANTS, independent_epsilon
from privfer.privacy.audit.local import ACCOUNTANTS, recompute
from privfer.privacy.audit.report import (MAX_CLIENTS, MAX_LEDGER_BYTES, MISMATCH, NO_DP, OVER_BUDGET, PUBLIC_NOISE,
                                          UNAUDITABLE, WEAK_DELTA, AuditReport, ClientAudit, LedgerError, LedgerKind,
                                          _field, _number)
from privfer.privacy.ledger import LEGACY_SCHEMAS, LOCAL, SCHEMA
from privfer.privacy.mechanisms import MECHANISMS

_MODULES = (  # one line per auditor module; each audits the ledgers of one accounting (its ACCOUNTING)
    "local",
    "distributed",
)
LEGACY_MECHANISM = LOCAL  # privfer.privacy_ledger/1 files predate 'mechanism_id': all of them are local DP-SGD

AUDITORS: dict[str, tuple] = {}  # accounting -> (check, audit)
TITLES: dict[str, str] = {}
for _module in _MODULES:
    _loaded = importlib.import_module(f"{__name__}.{_module}")
    if _loaded.ACCOUNTING in AUDITORS:
        raise RuntimeError(f"two auditors claim the accounting {_loaded.ACCOUNTING!r}")
    AUDITORS[_loaded.ACCOUNTING] = _loaded.AUDITOR
    TITLES.update(_loaded.TITLES)
# every registered mechanism's ledger kind: its unit and its accounting's auditor (privfer.privacy.mechanisms)
KINDS: dict[str, LedgerKind] = {
    mechanism.id: LedgerKind(mechanism.id, mechanism.unit, *AUDITORS[mechanism.accounting],
                             noise_in_sum=mechanism.noise_in_sum)
    for mechanism in MECHANISMS.values()
}


def mechanism_of(ledger: dict[str, Any]) -> str:
    """A ledger's mechanism id (a legacy ledger has none: it is local)."""
    return ledger.get("mechanism_id", LEGACY_MECHANISM)


def ledger_file(path: Path | str) -> Path:
    """The ledger file of ``path``: the file itself, or a run directory's privacy_ledger.json."""
    path = Path(path)
    return path / "privacy_ledger.json" if path.is_dir() else path


def load_ledger(path: Path | str) -> dict[str, Any]:
    """Read and check a ledger file (a run directory is accepted too); LedgerError names file and field. The
    document is returned as read: nothing is added to it."""
    path = ledger_file(path)
    if not path.is_file():
        raise LedgerError(f"{path} does not exist (a finished privfer simulate run writes it)")
    if path.stat().st_size > MAX_LEDGER_BYTES:
        raise LedgerError(f"{path} is {path.stat().st_size} bytes; ledgers of at most {MAX_LEDGER_BYTES} are read")
    try:
        ledger = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerError(f"{path} is not readable JSON ({exc.__class__.__name__})") from None
    if not isinstance(ledger, dict):
        raise LedgerError(f"{path}: the ledger must be a JSON object")
    schema = _field(ledger, "schema", str, path, "the ledger")
    if schema != SCHEMA and schema not in LEGACY_SCHEMAS:
        raise LedgerError(f"{path}: field 'schema' is {schema!r}; this privfer reads {SCHEMA!r}")
    kind = _header(ledger, path)
    kind.check(ledger, path, kind)
    return ledger


def _header(ledger: dict[str, Any], path: Path) -> LedgerKind:
    """The run-level fields every ledger needs; the kind its mechanism id names (LedgerError otherwise)."""
    mechanism = mechanism_of(ledger)
    kind = KINDS.get(mechanism) if isinstance(mechanism, str) else None
    if kind is None:
        raise LedgerError(f"{path}: field 'mechanism_id' is {mechanism!r}; expected one of {sorted(KINDS)}")
    private = _field(ledger, "private", bool, path, "the ledger")
    unit = ledger.get("unit", "record") if ledger.get("schema") in LEGACY_SCHEMAS else \
        _field(ledger, "unit", str, path, "the ledger")
    if unit != kind.unit and private:  # a run without DP protects nothing: its ledger states the configured unit
        raise LedgerError(f"{path}: field 'unit' is {unit!r}, but mechanism_id {mechanism!r} protects a "
                          f"{kind.unit}")
    _field(ledger, "accountant", str, path, "the ledger")
    delta = _field(ledger, "delta", (int, float), path, "the ledger")
    target = ledger.get("target_epsilon")
    if not (0 < delta < 1) or (target is not None and not (_number(target) and target > 0)):
        raise LedgerError(f"{path}: fields 'delta' (in (0, 1)) or 'target_epsilon' (a number > 0, or null: no "
                          "target to hold the entries to) out of range")
    clients = _field(ledger, "clients", list, path, "the ledger")
    if len(clients) > MAX_CLIENTS:
        raise LedgerError(f"{path}: {len(clients)} client entries; at most {MAX_CLIENTS} are audited")
    return kind


def audit_ledger_alone(ledger: dict[str, Any], path: Path | str = "privacy_ledger.json") -> AuditReport:
    """Recompute and judge every client of a loaded ledger, the ledger alone; ``path`` is where it was read
    (errors name it). NOT the full audit — the name says so, since a report audited alone passes where the run
    would contradict it: its ``run_checks`` is None, and holding the ledger to the run that wrote it
    (config.yaml, rounds.json) rebuilds the run's model and plans, which is :func:`privfer.auditing.audit_ledger`'s
    work, a layer above the trainers."""
    path = Path(path)
    kind = _header(ledger, path)  # again: a caller may hand over a document load_ledger never saw
    kind.check(ledger, path, kind)
    return kind.audit(ledger, path, kind)


__all__ = [
    "ACCOUNTANTS",
    "DISTRIBUTED_ACCOUNTANTS",
    "KINDS",
    "MISMATCH",
    "NO_DP",
    "OVER_BUDGET",
    "PUBLIC_NOISE",
    "TITLES",
    "UNAUDITABLE",
    "WEAK_DELTA",
    "AuditReport",
    "ClientAudit",
    "LedgerError",
    "audit_ledger_alone",
    "independent_epsilon",
    "ledger_file",
    "load_ledger",
    "mechanism_of",
    "recompute",
]
