"""Theoretical privacy audit of a run: every client's epsilon recomputed by independent accountants.

Reads a run's ``privacy_ledger.json`` (schema ``privfer.privacy_ledger/1``,
docs/privacy-accounting.md) and recomputes each client's epsilon from its
accountant history ``[[sigma, q, steps], ...]`` with four accountants:

* Opacus RDP and Opacus PRV (Gopi et al. 2021), the engine's own;
* Google's ``dp-accounting`` RDP and PLD (pessimistic estimate), built on
  ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), T)``
  composed over the client's rounds.

All four are sound upper bounds on the true epsilon of the Poisson-subsampled
Gaussian mechanism (RDP by its conversion, PRV and PLD up to their stated
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

import json
import logging
import math
import statistics
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from privfer.errors import PrivferError
from privfer.privacy.calibrate import PRV_MAX_EPSILON, PRV_MAX_STEPS, epsilon_spent, prv_affordable
from privfer.privacy.distributed import sensitivities
from privfer.privacy.ledger import LEGACY_SCHEMAS, SCHEMA
from privfer.privacy.noise import FAMILIES, LEGACY, NoiseFamily, noise_family
from privfer.privacy.rdp import MAX_STEPS

ACCOUNTANTS = ("opacus_rdp", "opacus_prv", "dp_accounting_rdp", "dp_accounting_pld")
INDEPENDENT = "_independent"  # a distributed family's accountant + this: the audit's second implementation
DISTRIBUTED_ACCOUNTANTS = tuple(name for family in FAMILIES.values()
                                for name in (family.accountant, family.accountant + INDEPENDENT))
TITLES = {"opacus_rdp": "Opacus RDP", "opacus_prv": "Opacus PRV", "dp_accounting_rdp": "dp-acc. RDP",
          "dp_accounting_pld": "dp-acc. PLD", "gaussian_floor": "Gaussian floor (PLD)",
          **{family.accountant: f"{family.title} RDP" for family in FAMILIES.values()},
          **{family.accountant + INDEPENDENT: f"{family.title} RDP (2nd impl.)" for family in FAMILIES.values()}}
MAX_HISTORY = 100_000  # entries per client: a longer history is refused before any accountant runs
MAX_CLIENTS = 1_000_000
MAX_LEDGER_BYTES = 256 << 20  # a larger file is refused before it is read
MAX_DISTINCT_STEPS = 64  # distributed: distinct (mu, l1, l2, q) per ledger (a real run has one per phase)
MAX_ENTRIES = 1_000_000  # distributed: history entries over all clients
FLOOR_MIN_NOISE = 0.3  # the Gaussian floor's PLD grows without bound as the noise vanishes: not computed below
PUBLIC_NOISE = "PUBLIC NOISE"
OVER_BUDGET, MISMATCH, WEAK_DELTA, NO_DP = "OVER BUDGET", "MISMATCH", "WEAK DELTA", "NO DP"
UNAUDITABLE = "UNAUDITABLE"  # an entry the audit will not evaluate (bounded work); the CLI exits 2
CLAIM_TOLERANCE = (0.01, 0.01)  # absolute, relative
RDP_TOLERANCE = 0.03
TIGHT_TOLERANCE = (0.05, 0.03)


class LedgerError(PrivferError):
    """A privacy ledger is missing, unreadable, or lacks a field; the message names the file and the field."""


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
    best = math.inf
    for alpha, rdp in zip(_INDEPENDENT_ORDERS, _independent_step_rdp(family, mu, l1, l2, q, shares, dimension)):
        best = min(best, steps * rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1))
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
        names = [n for n in (*ACCOUNTANTS, *DISTRIBUTED_ACCOUNTANTS) if any(n in c.values for c in self.clients)]
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


def _field(entry: dict[str, Any], name: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    if name not in entry:
        raise LedgerError(f"{path}: {where} lacks the field '{name}'")
    value = entry[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise LedgerError(f"{path}: {where} field '{name}' has the wrong type ({type(value).__name__})")
    return value


def _entry_history(entry: Any, index: int, path: Path, person: bool = False) -> tuple[str, list]:
    """The checks every client entry needs (either mechanism): an object with client, records, delta and a
    bounded history list. Returns (where, history)."""
    where = f"clients[{index}]"
    if not isinstance(entry, dict):
        raise LedgerError(f"{path}: {where} must be an object")
    _field(entry, "client", int, path, where)
    if not (entry.get("records", 0) is None and person):  # person level publishes no record counts
        _field(entry, "records", int, path, where)
    _field(entry, "delta", (int, float), path, where)
    history = _field(entry, "history", list, path, where)
    if len(history) > MAX_HISTORY:
        raise LedgerError(f"{path}: {where} field 'history' has {len(history)} entries (at most {MAX_HISTORY})")
    return where, history


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
    mechanism = ledger.get("mechanism_id", "local")
    if mechanism not in AUDITORS:
        raise LedgerError(f"{path}: field 'mechanism_id' is {mechanism!r}; expected one of {sorted(AUDITORS)}")
    ledger["mechanism_id"] = mechanism
    unit = ledger.get("unit", "record")
    if unit != UNITS[mechanism]:
        raise LedgerError(f"{path}: field 'unit' is {unit!r}, but mechanism_id {mechanism!r} protects a "
                          f"{UNITS[mechanism]}")
    _field(ledger, "accountant", str, path, "the ledger")
    _field(ledger, "delta", (int, float), path, "the ledger")
    _field(ledger, "private", bool, path, "the ledger")
    clients = _field(ledger, "clients", list, path, "the ledger")
    if len(clients) > MAX_CLIENTS:
        raise LedgerError(f"{path}: {len(clients)} client entries; at most {MAX_CLIENTS} are audited")
    CHECKS[mechanism](ledger, path)
    return ledger


def _check_local(ledger: dict[str, Any], path: Path) -> None:
    """The entries of a local DP-SGD ledger: Opacus histories of (noise multiplier, sample rate, steps)."""
    for index, entry in enumerate(ledger["clients"]):
        where, history = _entry_history(entry, index, path)
        for name in ("noise_multiplier", "sample_rate", "epsilon", "delta", "steps", "rounds_trained", "records"):
            value = entry.get(name)
            if value is not None and not _number(value):
                raise LedgerError(f"{path}: {where} field '{name}' must be a number, got {value!r}")
        for step, item in enumerate(history):
            ok = (
                isinstance(item, list)
                and len(item) == 3
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in item)
                and item[0] > 0
                and 0 < item[1] <= 1
                and item[2] >= 0
                and float(item[2]).is_integer()
            )
            if not ok:
                raise LedgerError(
                    f"{path}: {where} field 'history[{step}]' must be [noise_multiplier > 0, 0 < sample_rate <= 1, "
                    f"steps >= 0], got {item!r}"
                )
        if ledger["private"] and not history and entry.get("rounds_trained", 0):
            raise LedgerError(f"{path}: {where} trained but its field 'history' is empty")


_PLAN_FIELDS = ("max_grad_norm", "dimension", "scale", "l1", "l2", "mu", "share_variance", "sample_rate", "steps",
                "clients", "min_inputs", "colluders", "delta", "records")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def ledger_noise(ledger: dict[str, Any], path: Path) -> NoiseFamily:
    """The noise family of a distributed ledger (field 'noise'; a ledger without it was written when Skellam was the
    only one)."""
    name = ledger.get("noise", LEGACY)
    try:
        return noise_family(name)
    except ValueError:
        raise LedgerError(f"{path}: field 'noise' is {name!r}; expected one of {sorted(FAMILIES)}") from None


def _check_distributed(ledger: dict[str, Any], path: Path) -> None:
    family = ledger_noise(ledger, path)
    if ledger["accountant"] != family.accountant:
        raise LedgerError(f"{path}: field 'accountant' is {ledger['accountant']!r}; a {family.title} ledger's is "
                          f"{family.accountant!r}")
    phases = _field(ledger, "phases", dict, path, "the ledger")
    for phase, plan in phases.items():
        if not isinstance(plan, dict):
            raise LedgerError(f"{path}: phases.{phase} must be an object")
        for name in _PLAN_FIELDS:
            value = _field(plan, name, (int, float), path, f"phases.{phase}")
            if not _number(value) or value < 0:
                raise LedgerError(f"{path}: phases.{phase} field '{name}' must be a finite number >= 0")
        if not 0 < plan["sample_rate"] <= 1 or not 0 < plan["delta"] < 1 or not 1 <= plan["dimension"] <= 1e12:
            raise LedgerError(f"{path}: phases.{phase} has a sample_rate, delta or dimension out of range")
        if min(plan["mu"], plan["l1"], plan["l2"], plan["scale"], plan["max_grad_norm"]) <= 0:
            raise LedgerError(f"{path}: phases.{phase} needs positive mu, l1, l2, scale and max_grad_norm")
        if plan.get("noise", family.name) != family.name:
            raise LedgerError(f"{path}: phases.{phase} field 'noise' is {plan.get('noise')!r}, the ledger's is "
                              f"{family.name!r}")
        if not (1 <= plan["min_inputs"] - plan["colluders"] <= plan["clients"] <= MAX_CLIENTS):
            raise LedgerError(f"{path}: phases.{phase} needs 1 <= min_inputs - colluders <= clients <= "
                              f"{MAX_CLIENTS}")
    if len(phases) > 8:
        raise LedgerError(f"{path}: {len(phases)} phases; at most 8 are audited")
    entries, distinct = 0, set()
    person = ledger.get("mechanism_id") == "distributed_person"
    if person:
        persons = _field(ledger, "persons", int, path, "the ledger")
        if persons < 1:
            raise LedgerError(f"{path}: field 'persons' must be at least 1")
    for index, entry in enumerate(ledger["clients"]):
        where, history = _entry_history(entry, index, path, person)
        phase = _field(entry, "phase", str, path, where)
        if phase not in phases:
            raise LedgerError(f"{path}: {where} names phase {phase!r}, which has no plan in 'phases'")
        entries += len(history)
        if entries > MAX_ENTRIES:
            raise LedgerError(f"{path}: more than {MAX_ENTRIES} history entries over all clients")
        plan = phases[phase]
        honest, dimension = int(plan["min_inputs"] - plan["colluders"]), int(plan["dimension"])
        for step, item in enumerate(history):
            try:
                if not (isinstance(item, list) and all(_number(x) for x in item)):
                    raise ValueError
                parsed = family.parse_entry(item)
                distinct.add(family.entry_key(parsed))
            except ValueError:
                raise LedgerError(
                    f"{path}: {where} field 'history[{step}]' must be a {family.title} entry "
                    f"[{', '.join(family.fields)}] (mu, l1, l2 > 0, 0 < sample_rate <= 1, 0 <= steps <= {MAX_STEPS}), "
                    f"got {item!r}"
                ) from None
            if len(distinct) > MAX_DISTINCT_STEPS:
                raise LedgerError(f"{path}: more than {MAX_DISTINCT_STEPS} distinct step mechanisms in the "
                                  "histories (a run has one per phase)")
            # refused before any accountant runs: a bound's cost may grow with its shares or dimension
            implied = family.steps(parsed.mu, parsed.l1, parsed.l2, parsed.sample_rate, parsed.steps, honest, dimension)
            if (parsed.shares, parsed.dimension) != (implied.shares, implied.dimension):
                raise LedgerError(f"{path}: {where} field 'history[{step}]' claims {parsed.shares} noise shares over "
                                  f"{parsed.dimension} coordinates; its phase's plan guarantees {implied.shares} "
                                  f"over {implied.dimension}")


def _audit_distributed(ledger: dict[str, Any], path: Path) -> AuditReport:
    """Recompute each client's epsilon twice (two implementations of its noise family's bound) and check the plan's
    arithmetic."""
    target = ledger.get("target_epsilon")
    family = ledger_noise(ledger, path)
    first, second = family.accountant, family.accountant + INDEPENDENT
    audits = []
    for entry in ledger["clients"]:
        plan = ledger["phases"][entry["phase"]]
        delta = float(entry["delta"])
        claimed = entry.get("epsilon")
        history = [family.parse_entry(item) for item in entry["history"]]
        values = {first: family.epsilon(history, delta)[0] if history else 0.0}
        values[second] = sum(
            independent_epsilon(family, h.mu, h.l1, h.l2, h.sample_rate, h.steps, delta, h.shares, h.dimension)
            for h in history
        ) if len(history) == 1 else values[first]
        audit = ClientAudit(int(entry["client"]), str(entry["phase"]), int(entry["records"] or 0), delta,
                            None if claimed is None else float(claimed), values)
        mismatch: list[str] = []
        l1, l2 = sensitivities(float(plan["max_grad_norm"]), float(plan["scale"]), int(plan["dimension"]))
        if not (math.isclose(l1, plan["l1"], rel_tol=1e-9) and math.isclose(l2, plan["l2"], rel_tol=1e-9)):
            mismatch.append(f"the plan's sensitivities ({plan['l1']:.6g}, {plan['l2']:.6g}) are not C x scale + "
                            f"sqrt(d) and min(sqrt(d) l2, l2^2) = ({l1:.6g}, {l2:.6g})")
        honest = int(plan["min_inputs"]) - int(plan["colluders"])
        if honest < 1 or plan["share_variance"] * honest < plan["mu"] * (1 - 1e-9):
            mismatch.append(f"{honest} honest shares of variance {plan['share_variance']:.6g} do not carry the "
                            f"claimed mu {plan['mu']:.6g}")
        if plan["min_inputs"] > plan["clients"]:
            mismatch.append("min_inputs exceeds the clients per round")
        for h in history:
            if not (math.isclose(h.mu, plan["mu"], rel_tol=1e-9) and math.isclose(h.l1, l1, rel_tol=1e-9)
                    and math.isclose(h.l2, l2, rel_tol=1e-9)
                    and math.isclose(h.sample_rate, plan["sample_rate"], rel_tol=1e-12)):
                mismatch.append("the history's (mu, l1, l2, sample_rate) is not the phase's plan")
        steps = sum(h.steps for h in history)
        if entry.get("steps") is not None and int(entry["steps"]) != steps:
            mismatch.append(f"steps {entry['steps']} is not the history's {steps}")
        if entry.get("max_rounds") is not None and steps > int(entry["max_rounds"]):
            mismatch.append(f"{steps} steps, more than the run's {entry['max_rounds']} rounds")
        if audit.claimed is not None and not _close(audit.claimed, values[first], *CLAIM_TOLERANCE):
            mismatch.append(f"claimed {audit.claimed:.4f} but {first} gives {values[first]:.4f}")
        if not _close(values[first], values[second], 1e-6, 1e-6):
            mismatch.append(f"the two {family.title} implementations disagree: {values[first]:.6f} vs "
                            f"{values[second]:.6f}")
        if not math.isclose(delta, float(plan["delta"]), rel_tol=1e-12):
            mismatch.append(f"the entry's delta {delta:.6g} is not its phase's {plan['delta']:.6g}")
        if len(history) == 1 and history[0].steps:
            h = history[0]
            sigma = math.sqrt(h.mu) / h.l2  # the noise multiplier of the Gaussian with the same variance
            # the PLD's grid grows with the epsilon it computes and with steps: bounded like PRV's
            if sigma >= FLOOR_MIN_NOISE and h.steps <= PRV_MAX_STEPS and values[first] <= PRV_MAX_EPSILON:
                audit.floor = _gaussian_floor(sigma, h.sample_rate, h.steps, delta)
                if values[first] < audit.floor - 1e-6:
                    mismatch.append(f"the {family.title} bound {values[first]:.4f} is below the Gaussian with the "
                                    f"same variance ({audit.floor:.4f}, dp-accounting PLD)")
        person = ledger.get("mechanism_id") == "distributed_person"
        if person and int(plan["records"]) != int(plan["clients"]):
            mismatch.append(f"a person-level plan bounds the sum by its {plan['clients']} clients' updates, not "
                            f"{plan['records']}")
        over = []
        if target is not None and audit.certified > target + 1e-9:
            over.append(f"the tightest sound bound, {audit.certified:.4f}, exceeds the target {target:g}")
        if target is not None and audit.claimed is not None and audit.claimed > target + 1e-9:
            over.append(f"the claimed epsilon {audit.claimed:.4f} exceeds the target {target:g}")
        if over:
            audit.verdicts.append(OVER_BUDGET)
        if mismatch:
            audit.verdicts.append(MISMATCH)
        total_records = int(ledger["persons"]) if person else int(plan["records"])
        if total_records < 1 or delta >= 1.0 / total_records:
            audit.verdicts.append(WEAK_DELTA)
            units = "persons in the federation" if person else "records in a round's union"
            audit.reasons.append(f"delta {delta:.3g} >= 1 / {total_records} {units}")
        if ledger.get("noise_source") == "run_seed":
            audit.verdicts.append(PUBLIC_NOISE)
            audit.reasons.append("noise_source run_seed: anyone holding the config can recompute every noise share")
        audit.reasons[:0] = over + mismatch
        audits.append(audit)
    return AuditReport(path, str(ledger["accountant"]), target, True, audits)


def _close(a: float, b: float, absolute: float, relative: float) -> bool:
    return abs(a - b) <= absolute + relative * max(abs(a), abs(b))


def audit_path(path: Path | str) -> AuditReport:
    """Load the ledger at ``path`` (a file or a run directory) and audit it against its run directory."""
    return audit_ledger(load_ledger(path), ledger_file(path))


def audit_ledger(ledger: dict[str, Any], path: Path | str = "privacy_ledger.json") -> AuditReport:
    """Recompute and judge every client of a loaded ledger; ``path`` is where it was read (errors name it, and
    the run directory beside it is cross-checked)."""
    from privfer.privacy.crosscheck import cross_check

    path = Path(path)
    report = AUDITORS[ledger.get("mechanism_id", "local")](ledger, path)
    report.run_checks = cross_check(ledger, path.parent)
    return report


def _audit_local(ledger: dict[str, Any], path: Path) -> AuditReport:
    """Local DP-SGD: each client's Opacus history recomputed by two accountants."""
    accountant = ledger["accountant"]
    target = ledger.get("target_epsilon")
    audits = []
    for entry in ledger["clients"]:
        history: History = tuple((float(s), float(q), int(t)) for s, q, t in entry["history"])
        delta = float(entry["delta"])
        claimed = entry.get("epsilon")
        if not ledger["private"]:
            audit = ClientAudit(int(entry["client"]), str(entry.get("phase", "")), int(entry["records"]), delta,
                                None, {}, [NO_DP], ["trained without DP-SGD: no finite epsilon"])
            audits.append(audit)
            continue
        steps = sum(t for _, _, t in history)
        if steps > MAX_AUDIT_STEPS:
            audits.append(ClientAudit(int(entry["client"]), str(entry.get("phase", "")), int(entry["records"]),
                                      delta, None if claimed is None else float(claimed), {}, [UNAUDITABLE],
                                      [f"{steps} steps exceed the {MAX_AUDIT_STEPS} an audit evaluates"]))
            continue
        try:
            values = recompute(history, delta) if history else {name: 0.0 for name in ACCOUNTANTS}
        except (MemoryError, OverflowError, ValueError, FloatingPointError, RuntimeError) as exc:
            audits.append(ClientAudit(int(entry["client"]), str(entry.get("phase", "")), int(entry["records"]),
                                      delta, None if claimed is None else float(claimed), {}, [UNAUDITABLE],
                                      [f"the accountants cannot evaluate this history ({exc.__class__.__name__})"]))
            continue
        audit = ClientAudit(int(entry["client"]), str(entry.get("phase", "")), int(entry["records"]), delta,
                            None if claimed is None else float(claimed), values)
        _judge(audit, entry, history, str(entry.get("accountant", accountant)), target)
        if history and "opacus_prv" not in values:
            audit.reasons.append("PRV and PLD skipped (their cost grows with epsilon and steps); both RDP "
                                 "bounds recomputed")
        audits.append(audit)
    return AuditReport(path, accountant, target, bool(ledger["private"]), audits)


def _judge(audit: ClientAudit, entry: dict, history: History, accountant: str, target: float | None) -> None:
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
        if entry.get("noise_multiplier") is not None and any(
            not math.isclose(s, float(entry["noise_multiplier"]), rel_tol=1e-9) for s in sigmas
        ):
            mismatch.append(f"noise_multiplier {entry['noise_multiplier']} is not the history's {sorted(sigmas)}")
        if entry.get("sample_rate") is not None and any(
            not math.isclose(q, float(entry["sample_rate"]), rel_tol=1e-9) for q in rates
        ):
            mismatch.append(f"sample_rate {entry['sample_rate']} is not the history's {sorted(rates)}")
        if entry.get("steps") is not None and int(entry["steps"]) != sum(t for _, _, t in history):
            mismatch.append(f"steps {entry['steps']} is not the history's {sum(t for _, _, t in history)}")
    if over:
        audit.verdicts.append(OVER_BUDGET)
    if mismatch:
        audit.verdicts.append(MISMATCH)
    if audit.records > 0 and audit.delta >= 1.0 / audit.records:
        audit.verdicts.append(WEAK_DELTA)
        audit.reasons.append(f"delta {audit.delta:.3g} >= 1 / {audit.records} records")
    audit.reasons[:0] = over + mismatch


UNITS = {"local": "record", "distributed": "record", "distributed_person": "person"}  # mechanism_id -> its unit

# One entry per ledger mechanism_id (privfer.fl.mechanisms.Mechanism.id): how its entries are checked on load
# and how its epsilons are recomputed. A new mechanism adds its pair here.
# Person level is the same noise mechanism with other units (a person's clipped update, its secret coin as the
# sample rate, persons in the sum's bound), so the same checks and recomputation serve it.
CHECKS = {"local": _check_local, "distributed": _check_distributed, "distributed_person": _check_distributed}
AUDITORS = {"local": _audit_local, "distributed": _audit_distributed, "distributed_person": _audit_distributed}


__all__ = [
    "ACCOUNTANTS",
    "AuditReport",
    "ClientAudit",
    "LedgerError",
    "MISMATCH",
    "NO_DP",
    "OVER_BUDGET",
    "PUBLIC_NOISE",
    "UNAUDITABLE",
    "WEAK_DELTA",
    "TITLES",
    "audit_ledger", "audit_path", "independent_epsilon", "ledger_file", "ledger_noise",
    "load_ledger",
    "recompute",
]
