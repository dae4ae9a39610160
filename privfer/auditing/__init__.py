"""Audits of a run, above the trainers: the ones that rebuild, recalibrate or re-train what a run did.

* :func:`audit_path` / :func:`audit_ledger` — ``privfer audit``: the ledger's own recomputation
  (:mod:`privfer.privacy.audit`, torch-free) and then the cross-check of the ledger against the run directory
  that wrote it (:mod:`privfer.auditing.crosscheck`: config.yaml and rounds.json; the run's model is rebuilt to
  size its plans, so this layer sits above ``fl``).
* :mod:`privfer.auditing.empirical` — ``privfer canary-audit``: canaries trained into one worst-case client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from privfer.auditing.crosscheck import cross_check
from privfer.privacy.audit import AuditReport, audit_ledger_alone, ledger_file, load_ledger
from privfer.privacy.ledger import LEDGER_FILE, Ledger, parse_ledger


def audit_ledger(ledger: Ledger | dict[str, Any], path: Path | str = LEDGER_FILE) -> AuditReport:
    """Recompute and judge every client of a ledger read at ``path`` (typed, or a parsed document validated here),
    then cross-check it against the run directory beside ``path`` (``run_checks``: the disagreements, or None where
    the run's files are absent)."""
    path = Path(path)
    ledger = parse_ledger(ledger, path)
    report = audit_ledger_alone(ledger, path)
    report.run_checks = cross_check(ledger, path.parent)
    return report


def audit_path(path: Path | str) -> AuditReport:
    """Load the ledger at ``path`` (a file or a run directory), audit it and cross-check it against its run."""
    return audit_ledger(load_ledger(path), ledger_file(path))


__all__ = ["audit_ledger", "audit_path", "cross_check"]
