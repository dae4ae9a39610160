"""The audit of a distributed-DP ledger (record or person level): each client's epsilon recomputed twice.

Both implementations of the ledger's noise family's bound (:mod:`privfer.privacy.noise`)
recompute every entry; the plan's arithmetic is checked (sensitivities from the
clipping bound, scale and dimension; the honest shares carry the variance), and
the Gaussian with the same variance (dp-accounting PLD, near exact) is a floor
no family's bound can be below.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from pathlib import Path

from privfer.privacy.audit.report import (CLAIM_TOLERANCE, MISMATCH, OVER_BUDGET, PUBLIC_NOISE, UNAUDITABLE,
                                          WEAK_DELTA, AuditReport, ClientAudit, LedgerKind, _close)
from privfer.privacy.calibrate import PRV_MAX_EPSILON, PRV_MAX_STEPS
from privfer.privacy.distributed import sensitivities
from privfer.privacy.ledger import SecureSumLedger
from privfer.privacy.noise import FAMILIES, NoiseFamily, NoiseSteps

INDEPENDENT = "_independent"  # a distributed family's accountant + this: the audit's second implementation
DISTRIBUTED_ACCOUNTANTS = tuple(name for family in FAMILIES.values()
                                for name in (family.accountant, family.accountant + INDEPENDENT))
TITLES = {"gaussian_floor": "Gaussian floor (PLD)",
          **{family.accountant: f"{family.title} RDP" for family in FAMILIES.values()},
          **{family.accountant + INDEPENDENT: f"{family.title} RDP (2nd impl.)" for family in FAMILIES.values()}}
FLOOR_MIN_NOISE = 0.3  # the Gaussian floor's PLD grows without bound as the noise vanishes: not computed below


_INDEPENDENT_ORDERS = list(range(2, 257)) + [320, 384, 512, 768, 1024]


@lru_cache(maxsize=256)
def _independent_step_rdp(family: NoiseFamily, mu: float, l1: float, l2: float, q: float, shares: int,
                          dimension: int) -> tuple[float, ...]:
    """A second, loop-by-loop implementation of one step's RDP (no numpy, no shared code): the family's own second
    base RDP; Zhu & Wang's Theorem 6 for q < 1 at orders 2..256 (the larger orders unamplified)."""

    def base(alpha: int) -> float:
        return family.independent_base_rdp(alpha, l1, l2, mu, shares, dimension)

    values = []
    for alpha in _INDEPENDENT_ORDERS:
        rdp = base(alpha)
        if q < 1 and alpha <= 256:
            logs = [(alpha - 1) * math.log1p(-q) + math.log(alpha * q - q + 1)]
            for l in range(2, alpha + 1):
                log_binom = math.lgamma(alpha + 1) - math.lgamma(l + 1) - math.lgamma(alpha - l + 1)
                factor = 0.0 if l == 2 else math.log(3)
                logs.append(factor + log_binom + l * math.log(q) + (alpha - l) * math.log1p(-q) + (l - 1) * base(l))
            top = max(logs)
            rdp = min(rdp, (top + math.log(sum(math.exp(x - top) for x in logs))) / (alpha - 1))
        values.append(rdp)
    return tuple(values)


def independent_epsilon(family: NoiseFamily, mu: float, l1: float, l2: float, q: float, steps: int, delta: float,
                        shares: int = 1, dimension: int = 1) -> float:
    """Epsilon after ``steps`` steps from :func:`_independent_step_rdp`, converted as Balle et al. 2020."""
    return independent_composed_epsilon(family, [NoiseSteps(mu, l1, l2, q, steps, shares, dimension)], delta)


def independent_composed_epsilon(family: NoiseFamily, history: list[NoiseSteps], delta: float) -> float:
    """Epsilon of every entry of ``history`` composed, from :func:`_independent_step_rdp` (RDP adds over entries),
    converted as Balle et al. 2020."""
    total = [0.0] * len(_INDEPENDENT_ORDERS)
    for h in history:
        if h.steps:
            step = _independent_step_rdp(family, h.mu, h.l1, h.l2, h.sample_rate, h.shares, h.dimension)
            total = [t + h.steps * rdp for t, rdp in zip(total, step)]
    if not any(total):
        return 0.0
    best = math.inf
    for alpha, rdp in zip(_INDEPENDENT_ORDERS, total):
        best = min(best, rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1))
    return max(best, 0.0)


@lru_cache(maxsize=1024)
def _gaussian_floor(sigma: float, q: float, steps: int, delta: float) -> float:
    """dp-accounting's PLD epsilon of the Poisson-subsampled Gaussian with the same noise multiplier: near exact,
    and no integer family's bound (each adds a positive term to the Gaussian's RDP) can be below it."""
    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    accountant = dp_accounting.pld.PLDAccountant()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accountant.compose(event)
        return float(accountant.get_epsilon(delta))


def _audit_distributed(ledger: SecureSumLedger, path: Path, kind: LedgerKind) -> AuditReport:
    """Recompute each client's epsilon twice (two implementations of its noise family's bound) and check the plan's
    arithmetic."""
    target = ledger.target_epsilon
    family = ledger.family
    first, second = family.accountant, family.accountant + INDEPENDENT
    audits = []
    for entry in ledger.clients:
        plan = ledger.phases[entry.phase]
        delta = float(entry.delta)
        claimed = entry.epsilon
        history = entry.noise_steps
        try:
            values = {first: family.epsilon(history, delta)[0] if history else 0.0}
            values[second] = independent_composed_epsilon(family, history, delta)
        except (MemoryError, ArithmeticError, ValueError, RuntimeError) as exc:  # hostile values: bounded, refused
            audits.append(ClientAudit(entry.client, entry.phase, entry.records or 0, delta, float(claimed), {},
                                      [UNAUDITABLE], [f"the accountants cannot evaluate this history "
                                                      f"({exc.__class__.__name__})"]))
            continue
        audit = ClientAudit(entry.client, entry.phase, entry.records or 0, delta, float(claimed), values)
        mismatch: list[str] = []
        l1, l2 = sensitivities(float(plan.max_grad_norm), float(plan.scale), plan.dimension)
        if not (math.isclose(l1, plan.l1, rel_tol=1e-9) and math.isclose(l2, plan.l2, rel_tol=1e-9)):
            mismatch.append(f"the plan's sensitivities ({plan.l1:.6g}, {plan.l2:.6g}) are not C x scale + "
                            f"sqrt(d) and min(sqrt(d) l2, l2^2) = ({l1:.6g}, {l2:.6g})")
        honest = plan.honest
        if honest < 1 or plan.share_variance * honest < plan.mu * (1 - 1e-9):
            mismatch.append(f"{honest} honest shares of variance {plan.share_variance:.6g} do not carry the "
                            f"claimed mu {plan.mu:.6g}")
        if plan.min_inputs > plan.clients:
            mismatch.append("min_inputs exceeds the clients per round")
        for h in history:
            if not (math.isclose(h.mu, plan.mu, rel_tol=1e-9) and math.isclose(h.l1, l1, rel_tol=1e-9)
                    and math.isclose(h.l2, l2, rel_tol=1e-9)
                    and math.isclose(h.sample_rate, plan.sample_rate, rel_tol=1e-12)):
                mismatch.append("the history's (mu, l1, l2, sample_rate) is not the phase's plan")
        steps = sum(h.steps for h in history)
        if entry.steps != steps:
            mismatch.append(f"steps {entry.steps} is not the history's {steps}")
        if steps > entry.max_rounds:
            mismatch.append(f"{steps} steps, more than the run's {entry.max_rounds} rounds")
        if audit.claimed is not None and not _close(audit.claimed, values[first], *CLAIM_TOLERANCE):
            mismatch.append(f"claimed {audit.claimed:.4f} but {first} gives {values[first]:.4f}")
        if not _close(values[first], values[second], 1e-6, 1e-6):
            mismatch.append(f"the two {family.title} implementations disagree: {values[first]:.6f} vs "
                            f"{values[second]:.6f}")
        if not math.isclose(delta, float(plan.delta), rel_tol=1e-12):
            mismatch.append(f"the entry's delta {delta:.6g} is not its phase's {plan.delta:.6g}")
        if len(history) == 1 and history[0].steps:
            h = history[0]
            sigma = math.sqrt(h.mu) / h.l2  # the noise multiplier of the Gaussian with the same variance
            # the PLD's grid grows with the epsilon it computes and with steps: bounded like PRV's
            if sigma >= FLOOR_MIN_NOISE and h.steps <= PRV_MAX_STEPS and values[first] <= PRV_MAX_EPSILON:
                try:
                    audit.floor = _gaussian_floor(sigma, h.sample_rate, h.steps, delta)
                except (MemoryError, ArithmeticError, ValueError, RuntimeError):
                    audit.reasons.append("the Gaussian floor cannot be evaluated for this history")
                if audit.floor is not None and values[first] < audit.floor - 1e-6:
                    mismatch.append(f"the {family.title} bound {values[first]:.4f} is below the Gaussian with the "
                                    f"same variance ({audit.floor:.4f}, dp-accounting PLD)")
        person = kind.unit == "person"
        if person and plan.records != plan.clients:
            mismatch.append(f"a person-level plan bounds the sum by its {plan.clients} clients' updates, not "
                            f"{plan.records}")
        over = []
        if target is not None and audit.certified > target + 1e-9:
            over.append(f"the tightest sound bound, {audit.certified:.4f}, exceeds the target {target:g}")
        if target is not None and audit.claimed is not None and audit.claimed > target + 1e-9:
            over.append(f"the claimed epsilon {audit.claimed:.4f} exceeds the target {target:g}")
        if over:
            audit.verdicts.append(OVER_BUDGET)
        if mismatch:
            audit.verdicts.append(MISMATCH)
        total_records = int(ledger.persons or 0) if person else plan.records
        if total_records < 1 or delta >= 1.0 / total_records:
            audit.verdicts.append(WEAK_DELTA)
            units = "persons in the federation" if person else "records in a round's union"
            audit.reasons.append(f"delta {delta:.3g} >= 1 / {total_records} {units}")
        if ledger.noise_source == "run_seed":
            audit.verdicts.append(PUBLIC_NOISE)
            audit.reasons.append("noise_source run_seed: anyone holding the config can recompute every noise share")
        audit.reasons[:0] = over + mismatch
        audits.append(audit)
    return AuditReport(path, ledger.accountant, target, True, audits, columns=(first, second),
                       noise_in_sum=True)


# Person level is the same noise mechanism with other units (a person's clipped update, its secret coin as the
# sample rate, persons in the sum's bound), so the same checks and recomputation serve it.
ACCOUNTING = "secure_sum"  # the ledgers of the mechanisms with this accounting are audited here
AUDITOR = _audit_distributed


__all__ = ["DISTRIBUTED_ACCOUNTANTS", "INDEPENDENT", "TITLES", "independent_composed_epsilon", "independent_epsilon"]
