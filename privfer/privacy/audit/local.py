"""The audit of a local DP-SGD ledger: each client's Opacus history recomputed by four accountants.

Opacus RDP and PRV (Gopi et al. 2021), the engine's own, and Google's
``dp-accounting`` RDP and PLD, built on
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), T)``
composed over the client's rounds; see :mod:`privfer.privacy.audit` for the verdicts.
"""

from __future__ import annotations

import logging
import math
import warnings
from functools import lru_cache
from pathlib import Path

from privfer.privacy.audit.report import (CLAIM_TOLERANCE, MISMATCH, NO_DP, OVER_BUDGET, PUBLIC_NOISE, RDP_TOLERANCE,
                                          TIGHT_TOLERANCE, UNAUDITABLE, WEAK_DELTA, AuditReport, ClientAudit, LedgerKind,
                                          _close)
from privfer.privacy.calibrate import epsilon_spent, prv_affordable
from privfer.privacy.ledger import OpacusEntry, OpacusLedger

ACCOUNTANTS = ("opacus_rdp", "opacus_prv", "dp_accounting_rdp", "dp_accounting_pld")
TITLES = {"opacus_rdp": "Opacus RDP", "opacus_prv": "Opacus PRV", "dp_accounting_rdp": "dp-acc. RDP",
          "dp_accounting_pld": "dp-acc. PLD"}
History = tuple[tuple[float, float, int], ...]


@lru_cache(maxsize=4096)
def _dp_accounting_epsilon(history: History, delta: float, kind: str) -> float:
    import dp_accounting

    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
        for sigma, q, steps in history
    ]
    accountant = dp_accounting.rdp.RdpAccountant() if kind == "rdp" else dp_accounting.pld.PLDAccountant()
    # dp-accounting logs (absl) each RDP order whose series does not converge and leaves it out of the
    # minimum; the bound stays valid, so the audit keeps the terminal quiet.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            accountant.compose(dp_accounting.ComposedDpEvent(events))
            return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


MAX_AUDIT_STEPS = 10**9  # an entry claiming more steps is not evaluated at all (UNAUDITABLE)


@lru_cache(maxsize=4096)
def recompute(history: History, delta: float) -> dict[str, float]:
    """The four accountants' epsilons for one history at ``delta``; the two tight ones (PRV, PLD) only when
    their cost is bounded (:func:`privfer.privacy.calibrate.prv_affordable`: the RDP bound at most
    PRV_MAX_EPSILON, at most PRV_MAX_STEPS steps) — RDP's cost does not grow with steps or epsilon."""
    values = {
        "opacus_rdp": epsilon_spent(list(history), delta, "rdp"),
        "dp_accounting_rdp": _dp_accounting_epsilon(history, delta, "rdp"),
    }
    if prv_affordable(list(history), delta):
        values["opacus_prv"] = epsilon_spent(list(history), delta, "prv")
        values["dp_accounting_pld"] = _dp_accounting_epsilon(history, delta, "pld")
    return values


def _audit_local(ledger: OpacusLedger, path: Path, kind: LedgerKind) -> AuditReport:
    """Local DP-SGD: each client's Opacus history recomputed by four accountants."""
    target = ledger.target_epsilon
    audits = []
    for entry in ledger.clients:
        history: History = tuple((float(s), float(q), int(t)) for s, q, t in entry.history)
        delta = float(entry.delta)
        claimed = None if entry.epsilon is None else float(entry.epsilon)

        def client_audit(values: dict[str, float], verdicts: list[str], reasons: list[str]) -> ClientAudit:
            return ClientAudit(entry.client, entry.phase, entry.records, delta, claimed, values, verdicts, reasons)

        if not ledger.private:
            audits.append(client_audit({}, [NO_DP], ["trained without DP-SGD: no finite epsilon"]))
            continue
        steps = sum(t for _, _, t in history)
        if steps > MAX_AUDIT_STEPS:
            audits.append(client_audit({}, [UNAUDITABLE], [f"{steps} steps exceed the {MAX_AUDIT_STEPS} an audit "
                                                          "evaluates"]))
            continue
        try:
            values = recompute(history, delta) if history else {name: 0.0 for name in ACCOUNTANTS}
            values = {name: values[name] for name in ACCOUNTANTS if name in values}  # the report's column order
        except (MemoryError, ArithmeticError, ValueError, RuntimeError) as exc:  # (ZeroDivision, Overflow, ...)
            audits.append(client_audit({}, [UNAUDITABLE], [f"the accountants cannot evaluate this history "
                                                          f"({exc.__class__.__name__})"]))
            continue
        audit = client_audit(values, [], [])
        _judge(audit, entry, history, entry.accountant, target)
        if ledger.noise_source == "run_seed":  # as under distributed DP: a budget whose noise anyone can redraw
            audit.verdicts.append(PUBLIC_NOISE)
            audit.reasons.append("noise_source run_seed: anyone holding the config can recompute the client's "
                                 "DP-SGD noise")
        if history and "opacus_prv" not in values:
            audit.reasons.append("PRV and PLD skipped (their cost grows with epsilon and steps); both RDP "
                                 "bounds recomputed")
        audits.append(audit)
    return AuditReport(path, ledger.accountant, target, ledger.private, audits, columns=ACCOUNTANTS)


def _judge(audit: ClientAudit, entry: OpacusEntry, history: History, accountant: str, target: float | None) -> None:
    values = audit.values
    over, mismatch = [], []
    if target is not None and audit.certified > target + 1e-9:
        over.append(f"the tightest sound bound, {audit.certified:.4f}, exceeds the target {target:g}")
    if target is not None and audit.claimed is not None and audit.claimed > target + 1e-9:
        over.append(f"the claimed epsilon {audit.claimed:.4f} exceeds the target {target:g}")
    own = {"rdp": "opacus_rdp", "prv": "opacus_prv"}.get(accountant)
    if own == "opacus_prv" and own not in values:
        own = "opacus_rdp"  # beyond PRV's cost bounds privfer's own accountant reports the RDP bound too
    if own is not None and audit.claimed is not None and not _close(audit.claimed, values[own], *CLAIM_TOLERANCE):
        mismatch.append(f"claimed {audit.claimed:.4f} but {own} gives {values[own]:.4f}")
    if history:
        if not _close(values["opacus_rdp"], values["dp_accounting_rdp"], 0.0, RDP_TOLERANCE):
            mismatch.append(f"the RDP accountants disagree: {values['opacus_rdp']:.4f} vs "
                            f"{values['dp_accounting_rdp']:.4f}")
        if "dp_accounting_pld" in values:
            if not _close(values["opacus_prv"], values["dp_accounting_pld"], *TIGHT_TOLERANCE):
                mismatch.append(f"PRV {values['opacus_prv']:.4f} and PLD {values['dp_accounting_pld']:.4f} "
                                "disagree")
            tight = values["dp_accounting_pld"]
            slack = TIGHT_TOLERANCE[0] + TIGHT_TOLERANCE[1] * tight
            if min(values["opacus_rdp"], values["dp_accounting_rdp"]) < tight - slack:
                mismatch.append("an RDP bound is below the near-exact PLD value")
        sigmas = {s for s, _, _ in history}
        rates = {q for _, q, _ in history}
        if entry.noise_multiplier is None or any(
            not math.isclose(s, float(entry.noise_multiplier), rel_tol=1e-9) for s in sigmas
        ):
            mismatch.append(f"noise_multiplier {entry.noise_multiplier} is not the history's {sorted(sigmas)}")
        if any(not math.isclose(q, float(entry.sample_rate), rel_tol=1e-9) for q in rates):
            mismatch.append(f"sample_rate {entry.sample_rate} is not the history's {sorted(rates)}")
    if entry.steps != sum(t for _, _, t in history):
        mismatch.append(f"steps {entry.steps} is not the history's {sum(t for _, _, t in history)}")
    if over:
        audit.verdicts.append(OVER_BUDGET)
    if mismatch:
        audit.verdicts.append(MISMATCH)
    if audit.records > 0 and audit.delta >= 1.0 / audit.records:
        audit.verdicts.append(WEAK_DELTA)
        audit.reasons.append(f"delta {audit.delta:.3g} >= 1 / {audit.records} records")
    audit.reasons[:0] = over + mismatch


ACCOUNTING = "opacus"  # the ledgers of the mechanisms with this accounting are audited here
AUDITOR = _audit_local


__all__ = ["ACCOUNTANTS", "MAX_AUDIT_STEPS", "TITLES", "recompute"]
