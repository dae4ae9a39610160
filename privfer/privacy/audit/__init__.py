"""Theoretical privacy audit of a run: every client's epsilon recomputed by independent accountants.

Reads a run's ``privacy_ledger.json`` (docs/privacy-accounting.md) as its
mechanism's typed ledger (:mod:`privfer.privacy.ledger`: every field validated
on load) and recomputes it with the auditor of its ``mechanism_id``
(:data:`KINDS`, one per mechanism: the unit it protects, how its epsilons
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
from pathlib import Path
from typing import Any

from privfer.privacy.audit.distributed import DISTRIBUTED_ACCOUNTANTS, independent_epsilon
from privfer.privacy.audit.local import ACCOUNTANTS, recompute
from privfer.privacy.audit.report import (MISMATCH, NO_DP, OVER_BUDGET, PUBLIC_NOISE, UNAUDITABLE, WEAK_DELTA,
                                          AuditReport, ClientAudit, LedgerError, LedgerKind)
from privfer.privacy.ledger import LEDGER_FILE, Ledger, ledger_file, mechanism_of, parse_ledger, read_ledger
from privfer.privacy.mechanisms import MECHANISMS

_MODULES = (  # one line per auditor module; each audits the ledgers of one accounting (its ACCOUNTING)
    "local",
    "distributed",
)

AUDITORS: dict[str, Any] = {}  # accounting -> the recomputation of its ledgers
TITLES: dict[str, str] = {}
for _module in _MODULES:
    _loaded = importlib.import_module(f"{__name__}.{_module}")
    if _loaded.ACCOUNTING in AUDITORS:
        raise RuntimeError(f"two auditors claim the accounting {_loaded.ACCOUNTING!r}")
    AUDITORS[_loaded.ACCOUNTING] = _loaded.AUDITOR
    TITLES.update(_loaded.TITLES)
# every registered mechanism's ledger kind: its unit and its accounting's auditor (privfer.privacy.mechanisms)
KINDS: dict[str, LedgerKind] = {
    mechanism.id: LedgerKind(mechanism.id, mechanism.unit, AUDITORS[mechanism.accounting],
                             noise_in_sum=mechanism.noise_in_sum)
    for mechanism in MECHANISMS.values()
}


def load_ledger(path: Path | str) -> Ledger:
    """Read and validate a ledger file (a run directory is accepted too): its mechanism's typed ledger
    (:func:`privfer.privacy.ledger.read_ledger`); LedgerError names file and field."""
    return read_ledger(path)


def audit_ledger_alone(ledger: Ledger | dict[str, Any], path: Path | str = LEDGER_FILE) -> AuditReport:
    """Recompute and judge every client of a ledger (typed, or a parsed document validated here), the ledger
    alone; ``path`` is where it was read (errors name it). NOT the full audit — the name says so, since a report
    audited alone passes where the run would contradict it: its ``run_checks`` is None, and holding the ledger to
    the run that wrote it (config.yaml, rounds.json) rebuilds the run's model and plans, which is
    :func:`privfer.auditing.audit_ledger`'s work, a layer above the trainers."""
    path = Path(path)
    ledger = parse_ledger(ledger, path)
    kind = KINDS[mechanism_of(ledger)]
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
