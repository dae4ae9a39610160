"""What a privacy audit finds: per client the recomputed epsilons, the verdicts and why; the limits and tolerances.

Shared by every mechanism's auditor (:mod:`privfer.privacy.audit.local`,
:mod:`privfer.privacy.audit.distributed`); the verdicts are explained in
:mod:`privfer.privacy.audit` and docs/auditing.md.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from privfer.privacy.ledger import MAX_CLIENTS, MAX_HISTORY, MAX_LEDGER_BYTES, LedgerBase, LedgerError

PUBLIC_NOISE = "PUBLIC NOISE"
OVER_BUDGET, MISMATCH, WEAK_DELTA, NO_DP = "OVER BUDGET", "MISMATCH", "WEAK DELTA", "NO DP"
UNAUDITABLE = "UNAUDITABLE"  # an entry the audit will not evaluate (bounded work); the CLI exits 2
CLAIM_TOLERANCE = (0.01, 0.01)  # absolute, relative
RDP_TOLERANCE = 0.03
TIGHT_TOLERANCE = (0.05, 0.03)


@dataclass(frozen=True)
class LedgerKind:
    """How the ledger of one mechanism (its ``mechanism_id``) is audited: the unit it protects and the
    recomputation of its epsilons (the ledger's model validated its fields when it was read)."""

    mechanism_id: str
    unit: str
    audit: Callable[[LedgerBase, Path, "LedgerKind"], "AuditReport"]
    noise_in_sum: bool = False  # the ledger holds each phase's plan of the noise in the secure sum ('phases')


@dataclass
class ClientAudit:
    client: int
    phase: str
    records: int
    delta: float
    claimed: float | None
    values: dict[str, float]
    verdicts: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    floor: float | None = None  # distributed: the Gaussian-equivalent epsilon, a lower reference (not a bound)

    @property
    def certified(self) -> float | None:
        """The tightest sound upper bound (None without DP)."""
        return min(self.values.values()) if self.values else None


@dataclass
class AuditReport:
    ledger: Path
    accountant: str
    target: float | None
    private: bool
    clients: list[ClientAudit]
    # disagreements with the run directory's config.yaml and rounds.json; None: not cross-checked (no run files)
    run_checks: list[str] | None = None
    columns: tuple[str, ...] = ()  # the auditor's accountants, in the order reports show them
    noise_in_sum: bool = False  # a distributed ledger: the Gaussian floor applies

    @property
    def passed(self) -> bool:
        return all(not c.verdicts for c in self.clients) and not self.run_checks

    @property
    def unauditable(self) -> list[ClientAudit]:
        return [c for c in self.clients if UNAUDITABLE in c.verdicts]

    def verdict_counts(self) -> dict[str, int]:
        counts = {OVER_BUDGET: 0, MISMATCH: 0, WEAK_DELTA: 0, PUBLIC_NOISE: 0, NO_DP: 0, UNAUDITABLE: 0}
        for client in self.clients:
            for verdict in client.verdicts:
                counts[verdict] += 1
        return counts

    def summary(self) -> dict[str, dict[str, float]]:
        """min / median / max of each accountant and of the claimed epsilon over the clients."""
        columns = {"claimed": [c.claimed for c in self.clients if c.claimed is not None]}
        names = [n for n in self.columns if any(n in c.values for c in self.clients)]
        for name in names:
            columns[name] = [c.values[name] for c in self.clients if name in c.values]
        columns["gaussian_floor"] = [c.floor for c in self.clients if c.floor is not None]
        return {
            name: {"min": min(v), "median": statistics.median(v), "max": max(v)} for name, v in columns.items() if v
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "ledger": str(self.ledger),
            "accountant": self.accountant,
            "target_epsilon": self.target,
            "private": self.private,
            "passed": self.passed,
            "verdicts": self.verdict_counts(),
            "run_checks": self.run_checks,  # None: the ledger was audited alone (no config.yaml / rounds.json)
            "tolerances": {
                "claim": {"absolute": CLAIM_TOLERANCE[0], "relative": CLAIM_TOLERANCE[1]},
                "rdp_vs_rdp_relative": RDP_TOLERANCE,
                "prv_vs_pld": {"absolute": TIGHT_TOLERANCE[0], "relative": TIGHT_TOLERANCE[1]},
            },
            "summary": self.summary(),
            "clients": [asdict(c) | {"certified": c.certified} for c in self.clients],
        }


def _close(a: float, b: float, absolute: float, relative: float) -> bool:
    return abs(a - b) <= absolute + relative * max(abs(a), abs(b))


__all__ = ["CLAIM_TOLERANCE", "MAX_CLIENTS", "MAX_HISTORY", "MAX_LEDGER_BYTES", "MISMATCH", "NO_DP", "OVER_BUDGET",
           "PUBLIC_NOISE", "RDP_TOLERANCE", "TIGHT_TOLERANCE", "UNAUDITABLE", "WEAK_DELTA", "AuditReport",
           "ClientAudit", "LedgerError", "LedgerKind"]
