"""The audit of a tuning run (``privfer audit TUNE_DIR``): every candidate charged, every ledger bound, the
composition recomputed.

A tuning ledger (:mod:`privfer.privacy.ledger.tuning`) claims that the declared
space's candidates were all trained and each client's epsilon composed over
them is within the user's budget. The audit believes none of it:

* the candidates listed are exactly the product of the declared space, in
  order, each with its settings, and no other candidate directory exists (a
  candidate dropped from the ledger, or a count edited, is ``TAMPERED``: every
  candidate the server saw costs budget);
* each candidate's ledger is the file its SHA-256 names, passes the full audit
  of its own run (:func:`privfer.auditing.audit_path`: recomputed twice and
  held to the run's config and rounds) at the candidate's stated budget, and its
  run's config holds the candidate's settings;
* the final run (the chosen candidate's settings trained once more after the
  selection): its ledger is the file its SHA-256 names and passes its own
  audit, its budget is the one the rebuilt plan leaves to the chosen candidate
  after every candidate, its ``config.yaml`` is exactly that run's, and a
  ``final/`` directory the ledger does not list is ``TAMPERED``;
* each training client's epsilon is recomposed over every candidate ledger it
  appears in and the final run's, with both implementations of the noise
  family's bound (the accountant's and the audit's loop-by-loop one), and held
  to the claim and to the user's epsilon;
* the validation ledger (private scores) is the file its SHA-256 names, passes
  its own audit, charges one release per candidate, and its validation clients
  are none of the training clients; consenting scores are named in
  ``not_covered``;
* the run is rebuilt from the tuning directory's ``config.yaml`` and the
  declared space (its data read, its candidates prepared): the target is the
  config's, each candidate's ``config.yaml`` is exactly the candidate the space
  and the budget make, the per-candidate budget is the one the declared number
  of candidates and the pilot share calibrate, and the validation plan (clients, records, trust,
  noise) is the one the split makes.

What it cannot catch: a directory whose every file was rewritten
consistently, e.g. a smaller space declared and every candidate retrained at
the budget that space calibrates, is a genuine run of that smaller space.
Nor, without retraining, a run whose final run was deleted and whose target
was lowered to the pilot share (its pilots are exactly the candidates of a
run with the whole of that smaller budget): ``privfer audit --epsilon E``
holds the target to the budget the user was promised, which refuses it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from privfer.auditing import audit_path
from privfer.data.clips import cremad_clip_plan
from privfer.privacy.audit import MISMATCH, OVER_BUDGET, UNAUDITABLE, audit_ledger_alone
from privfer.privacy.audit.distributed import independent_composed_epsilon
from privfer.privacy.audit.report import CLAIM_TOLERANCE, AuditReport, _close
from privfer.privacy.ledger import LEDGER_FILE, MAX_LEDGER_BYTES, LedgerError, SecureSumLedger, read_ledger
from privfer.privacy.ledger.tuning import FINAL_RUN, TUNING_LEDGER_FILE, TuningLedger, read_tuning_ledger
from privfer.privacy.noise import NoiseSteps, noise_family

TAMPERED = "TAMPERED"
MAX_REBUILD_VALUES = 5 * 10**8  # feature values the audit generates to rebuild a synthetic run (2 GB as float32)
SYNTHETIC_CLIPS_PER_ACTOR = len(cremad_clip_plan())  # the generator records CREMA-D's plan per actor (82 clips)
CANDIDATE_FAILS = "CANDIDATE FAILS AUDIT"
CONSENT_LINE = "privfer tune --validation consenting"  # what the not_covered statement of consenting scores names


@dataclass
class TuningAudit:
    ledger: Path
    target: float | None
    private: bool
    candidates: int
    declared: int
    verdicts: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)  # client, phase, claimed, accountant, independent
    validation: AuditReport | None = None
    final: bool = False  # the ledger lists a final run (charged in every client's composition)

    @property
    def passed(self) -> bool:
        return not self.verdicts

    @property
    def epsilon_max(self) -> float | None:
        """The largest recomposed epsilon of any training client (the tighter of the two implementations)."""
        values = [min(c["accountant"], c["independent"]) for c in self.clients]
        return max(values) if values else None

    def flag(self, verdict: str, reason: str) -> None:
        if verdict not in self.verdicts:
            self.verdicts.append(verdict)
        self.reasons.append(reason)

    def to_dict(self) -> dict[str, Any]:
        return {"ledger": str(self.ledger), "passed": self.passed, "target": self.target, "private": self.private,
                "candidates": self.candidates, "declared": self.declared, "final": self.final,
                "verdicts": self.verdicts,
                "reasons": self.reasons, "epsilon_max": self.epsilon_max, "clients": self.clients,
                "validation": None if self.validation is None else self.validation.to_dict()}


def is_tuning_run(path: Path | str) -> bool:
    path = Path(path)
    return path.name == TUNING_LEDGER_FILE or (path.is_dir() and (path / TUNING_LEDGER_FILE).is_file())


def _sha256(path: Path) -> str | None:
    """The digest of a regular file (not a link, a FIFO or a device) of at most MAX_LEDGER_BYTES; None otherwise."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_LEDGER_BYTES:
            return None
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    """A run's config.yaml as a mapping of sections (None: missing, unreadable, too large or not that shape)."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_LEDGER_BYTES:
            return None
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) and all(isinstance(v, (dict, int)) for v in loaded.values()) else None


def audit_tuning(path: Path | str, promised: float | None = None) -> TuningAudit:
    """Audit the tuning run at ``path`` (its directory or its tuning_ledger.json); LedgerError when unreadable.
    ``promised``: the total budget the run was promised (the target must be it: a directory relabelled at a smaller
    target, e.g. its pilots presented as a whole run at the pilot share, otherwise reads as a genuine smaller run)."""
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    ledger = read_tuning_ledger(run_dir)
    expected = [dict(zip(ledger.space, values)) for values in itertools.product(*ledger.space.values())]
    audit = TuningAudit(run_dir / TUNING_LEDGER_FILE, ledger.target_epsilon, ledger.private, len(ledger.candidates),
                        len(expected), final=ledger.final is not None)
    if promised is not None and (ledger.target_epsilon is None or not math.isclose(ledger.target_epsilon, promised,
                                                                                   rel_tol=1e-9)):
        audit.flag(MISMATCH, f"the ledger's target epsilon is {ledger.target_epsilon}, not the promised {promised:g}")
    _candidates_are_the_space(ledger, expected, run_dir, audit)
    plan = _rebuilt(ledger, run_dir, audit)
    candidate_ledgers = _candidate_ledgers(ledger, run_dir, audit, plan)
    final = _final_ledger(ledger, run_dir, audit, plan)
    if ledger.private:
        _recompose(ledger, [*candidate_ledgers, final], audit, final)
        _validation(ledger, run_dir, audit, [*candidate_ledgers, final], plan)
    elif ledger.validation != "exact":
        audit.flag(MISMATCH, "a non-private tuning ledger's scores are exact")
    return audit


def _rebuilt(ledger: TuningLedger, run_dir: Path, audit: TuningAudit) -> Any:
    """The tuning plan rebuilt from the directory's config.yaml and the declared space (None where it cannot be)."""
    from privfer.config.loading import build_config
    from privfer.errors import PrivferError
    from privfer.fl.tuning import plan_tuning

    raw = _read_yaml(run_dir / "config.yaml")
    if raw is None:
        audit.flag(MISMATCH, "config.yaml is missing or unreadable: the run cannot be rebuilt")
        return None
    try:
        config = build_config(raw, source=f"{run_dir}/config.yaml")
    except PrivferError as exc:
        audit.flag(MISMATCH, f"config.yaml is not a valid config ({exc})")
        return None
    target = config.privacy.epsilon if config.privacy.enabled else None
    if target != ledger.target_epsilon:
        audit.flag(MISMATCH, f"the ledger's target epsilon is {ledger.target_epsilon}, config.yaml's {target}")
    data = config.data
    if data.source == "synthetic":  # bound the rebuild before any data is made (a hostile config may ask for GBs)
        values = data.synthetic.actors * SYNTHETIC_CLIPS_PER_ACTOR * data.frames * data.feature_dim
        if values > MAX_REBUILD_VALUES:
            audit.flag(UNAUDITABLE, f"config.yaml's synthetic data ({values:.3g} values) is beyond the audit's bound "
                                    f"of {MAX_REBUILD_VALUES:.3g} for rebuilding the run")
            return None
    try:
        share = (1.0 if ledger.pilot_share is None else ledger.pilot_share) if ledger.private else None
        return plan_tuning(config, {key: list(values) for key, values in ledger.space.items()}, ledger.validation,
                           pilot_share=share)
    except (PrivferError, ValueError) as exc:
        audit.flag(MISMATCH, f"the run cannot be rebuilt from config.yaml and the declared space ({exc})")
    except Exception as exc:  # noqa: BLE001  hostile input must end in a verdict, never a traceback
        audit.flag(UNAUDITABLE, f"the run cannot be rebuilt from config.yaml and the declared space "
                                f"({exc.__class__.__name__})")
    return None


def _candidates_are_the_space(ledger: TuningLedger, expected: list[dict[str, Any]], run_dir: Path,
                              audit: TuningAudit) -> None:
    if ledger.candidates_declared != len(expected):
        audit.flag(TAMPERED, f"the ledger states {ledger.candidates_declared} candidates declared; its search space "
                             f"declares {len(expected)}")
    if len(ledger.candidates) != len(expected):
        audit.flag(TAMPERED, f"the ledger lists {len(ledger.candidates)} candidates; its search space declares "
                             f"{len(expected)}, and every candidate trained is charged")
    for candidate, settings in zip(ledger.candidates, expected):
        if candidate.settings != settings:
            audit.flag(TAMPERED, f"candidate {candidate.index}'s settings {candidate.settings} are not the space's "
                                 f"{settings}")
    listed = {candidate.run for candidate in ledger.candidates}
    folder = run_dir / "candidates"
    if folder.is_dir():
        for child in sorted(folder.iterdir())[:1000]:
            if not child.name.startswith(".") and f"candidates/{child.name}" not in listed:
                audit.flag(TAMPERED, f"candidates/{child.name} exists but is not in the ledger: a candidate the "
                                     "server saw is not charged")


def _candidate_ledgers(ledger: TuningLedger, run_dir: Path, audit: TuningAudit,
                       plan: Any) -> list[SecureSumLedger | None]:
    """Each candidate's ledger, checked against its digest, its own full audit and the candidate the rebuilt plan
    makes (its whole config and its budget)."""
    ledgers: list[SecureSumLedger | None] = []
    rebuilt = {c.index: c for c in plan.candidates} if plan is not None else {}
    if plan is not None and plan.budget is not None:
        for candidate in ledger.candidates:
            if candidate.epsilon is None or not math.isclose(candidate.epsilon, plan.budget, rel_tol=1e-9):
                audit.flag(MISMATCH, f"candidate {candidate.index} was trained at epsilon {candidate.epsilon}; the "
                                     f"{audit.declared} candidates the space declares are each calibrated to "
                                     f"{plan.budget:.6g}")
    for candidate in ledger.candidates:
        expected = rebuilt.get(candidate.index)
        if expected is not None and _read_yaml(run_dir / candidate.run / "config.yaml") != expected.config.to_dict():
            audit.flag(MISMATCH, f"{candidate.run}/config.yaml is not the candidate the space and the budget make "
                                 f"({', '.join(f'{k}={v}' for k, v in candidate.settings.items())})")
        ledgers.append(_run_ledger(ledger, run_dir, candidate.run, candidate.ledger_sha256, candidate.epsilon, audit))
    return ledgers


def _run_ledger(ledger: TuningLedger, run_dir: Path, run: str, digest: str, epsilon: float | None,
                audit: TuningAudit) -> SecureSumLedger | None:
    """A run's ledger (a candidate's or the final run's): the file its digest names, passing its own full audit, a
    secure-sum ledger at ``epsilon`` with the tuning ledger's delta, mechanism, noise and unit (None where it cannot
    be used)."""
    file = run_dir / run / LEDGER_FILE
    found = _sha256(file)
    if found != digest:
        audit.flag(TAMPERED, f"{run}/{LEDGER_FILE} " + ("is missing" if found is None else
                                                        "is not the file the tuning ledger's SHA-256 names"))
        return None
    try:
        report = audit_path(file)
        parsed = read_ledger(file)
    except (LedgerError, ValueError) as exc:
        audit.flag(CANDIDATE_FAILS, f"{run}: {exc}")
        return None
    if not report.passed or report.unauditable:
        first = next((c for c in report.clients if c.verdicts), None)
        why = first.reasons[0] if first is not None and first.reasons else "; ".join(report.run_checks or [])
        audit.flag(CANDIDATE_FAILS, f"{run} fails its own audit ({why})")
        if report.unauditable:
            return None
    if not ledger.private:
        if parsed.private:
            audit.flag(MISMATCH, f"{run}'s ledger is private, the tuning ledger is not")
        return None
    if not isinstance(parsed, SecureSumLedger):
        audit.flag(MISMATCH, f"{run}'s ledger is not a secure-sum ledger")
        return None
    checks = {"target_epsilon": (parsed.target_epsilon, epsilon), "delta": (parsed.delta, ledger.delta),
              "mechanism_id": (parsed.mechanism_id, ledger.mechanism_id), "noise": (parsed.family.name, ledger.noise),
              "unit": (parsed.unit, ledger.unit)}
    for name, (theirs, ours) in checks.items():
        if theirs != ours:
            audit.flag(MISMATCH, f"{run}'s ledger has {name} {theirs!r}, the tuning ledger {ours!r}")
    return parsed


def _final_ledger(ledger: TuningLedger, run_dir: Path, audit: TuningAudit, plan: Any) -> SecureSumLedger | None:
    """The final run's ledger, checked against its digest, its own full audit, the budget the rebuilt plan leaves to
    the chosen candidate and the config it makes; a final directory the tuning ledger does not list is flagged."""
    where = run_dir / FINAL_RUN
    if ledger.final is None:
        if where.exists() or where.is_symlink():
            audit.flag(TAMPERED, f"{FINAL_RUN}/ exists but the tuning ledger has no final run: the sums the server saw "
                                 "in its rounds are not charged")
        if plan is not None and plan.final:
            audit.flag(MISMATCH, f"the run's pilot share {plan.pilot_share:g} leaves a final run the ledger does not "
                                 "list")
        return None
    if plan is not None and ledger.chosen < len(plan.candidates):  # more listed than the space makes: TAMPERED above
        if not plan.final:
            audit.flag(MISMATCH, "the tuning ledger lists a final run, but its pilot share leaves none")
        else:
            expected = plan.final_budgets[ledger.chosen]
            if not math.isclose(ledger.final.epsilon, expected, rel_tol=1e-9):
                audit.flag(MISMATCH, f"the final run was trained at epsilon {ledger.final.epsilon}; after the "
                                     f"candidates the budget leaves it {expected:.6g}")
            if _read_yaml(where / "config.yaml") != plan.final_config(ledger.chosen).to_dict():
                audit.flag(MISMATCH, f"{FINAL_RUN}/config.yaml is not the chosen candidate's settings at the final "
                                     "run's budget")
    return _run_ledger(ledger, run_dir, FINAL_RUN, ledger.final.ledger_sha256, ledger.final.epsilon, audit)


def _recompose(ledger: TuningLedger, run_ledgers: list[SecureSumLedger | None], audit: TuningAudit,
               final: SecureSumLedger | None) -> None:
    """Every training client's history over every candidate and the final run, composed twice, against the claim
    and the budget."""
    family = noise_family(ledger.noise)
    histories: dict[tuple[int, str], list[NoiseSteps]] = {}
    for parsed in run_ledgers:
        if parsed is None:
            continue
        for entry in parsed.clients:
            histories.setdefault((entry.client, entry.phase), []).extend(entry.noise_steps)
    in_final = {(entry.client, entry.phase) for entry in final.clients} if final is not None else set()
    claimed = {(entry.client, entry.phase): entry for entry in ledger.clients}
    for key, entry in claimed.items():
        if entry.final is not None and entry.final != (key in in_final):
            audit.flag(MISMATCH, f"client {key[0]}: the tuning ledger says it is {'' if entry.final else 'not '}in "
                                 "the final run, the final run's ledger says otherwise")
    if set(claimed) != set(histories):
        missing = sorted(set(histories) - set(claimed))[:3]
        audit.flag(TAMPERED if missing else MISMATCH,
                   f"the tuning ledger's clients are not the candidates' (e.g. {missing or sorted(set(claimed))[:3]})")
    target, delta = float(ledger.target_epsilon), float(ledger.delta)
    for (client, phase), history in sorted(histories.items()):
        try:
            first = family.epsilon(history, delta)[0] if history else 0.0
            second = independent_composed_epsilon(family, history, delta)
        except (MemoryError, ArithmeticError, ValueError, RuntimeError) as exc:  # hostile values: refused, bounded
            audit.flag(UNAUDITABLE, f"client {client}: the accountants cannot evaluate its composed history "
                                    f"({exc.__class__.__name__})")
            continue
        entry = claimed.get((client, phase))
        row = {"client": client, "phase": phase, "claimed": None if entry is None else entry.epsilon,
               "accountant": first, "independent": second}
        audit.clients.append(row)
        if not _close(first, second, 1e-6, 1e-6):
            audit.flag(MISMATCH, f"client {client}: the two {family.title} implementations disagree on the "
                                 f"composition ({first:.6f} vs {second:.6f})")
        if entry is not None and not _close(entry.epsilon, first, *CLAIM_TOLERANCE):
            audit.flag(MISMATCH, f"client {client}: claimed {entry.epsilon:.4f}, the composition over the candidates "
                                 f"gives {first:.4f}")
        if min(first, second) > target + 1e-9 or (entry is not None and entry.epsilon > target + 1e-9):
            audit.flag(OVER_BUDGET, f"client {client}: composed over the candidates {min(first, second):.4f} exceeds "
                                    f"the budget {target:g}")


def _validation(ledger: TuningLedger, run_dir: Path, audit: TuningAudit,
                run_ledgers: list[SecureSumLedger | None], rebuilt: Any) -> None:
    if ledger.validation == "consenting":
        if not any(CONSENT_LINE in line for line in ledger.not_covered):
            audit.flag(MISMATCH, "consenting validation scores are not named in not_covered")
        return
    file = run_dir / str(ledger.validation_ledger)
    digest = _sha256(file)
    if digest != ledger.validation_ledger_sha256:
        audit.flag(TAMPERED, f"{ledger.validation_ledger} " + ("is missing" if digest is None else
                                                               "is not the file the tuning ledger's SHA-256 names"))
        return
    try:
        parsed = read_ledger(file)
        report = audit_ledger_alone(parsed, file)
    except (LedgerError, ValueError) as exc:
        audit.flag(MISMATCH, f"{ledger.validation_ledger}: {exc}")
        return
    audit.validation = report
    if not report.passed or report.unauditable:
        first = next((c for c in report.clients if c.verdicts), None)
        audit.flag(CANDIDATE_FAILS if first is None else first.verdicts[0],
                   f"{ledger.validation_ledger} fails its audit ({first.reasons[0] if first and first.reasons else ''})")
    if not isinstance(parsed, SecureSumLedger) or set(parsed.phases) != {"validation"}:
        audit.flag(MISMATCH, f"{ledger.validation_ledger} is not a secure-sum ledger of one 'validation' phase")
        return
    plan = parsed.phases["validation"]
    releases = max(len(ledger.candidates), audit.declared)  # every candidate the space declares is scored once
    if plan.max_grad_norm != 1 or plan.dimension != 1:
        audit.flag(MISMATCH, f"{ledger.validation_ledger}'s plan bounds a score by {plan.max_grad_norm:g} over "
                             f"{plan.dimension} coordinates; one record (or person) moves it by at most 1, in 1")
    if parsed.target_epsilon is None or not math.isclose(parsed.target_epsilon, float(ledger.target_epsilon),
                                                         rel_tol=1e-12):
        audit.flag(MISMATCH, f"{ledger.validation_ledger}'s target is not the tuning run's {ledger.target_epsilon:g}")
    charged = {entry.rounds_trained for entry in parsed.clients}
    if charged != {releases} or plan.steps != releases:
        audit.flag(TAMPERED, f"{ledger.validation_ledger} charges {sorted(charged)} score releases per validation "
                             f"client (plan: {plan.steps}); {releases} candidates were scored")
    training = {entry.client for other in run_ledgers if other is not None for entry in other.clients}
    shared = sorted(training & {entry.client for entry in parsed.clients})
    if shared:  # a person in both groups pays both budgets: the split must keep them apart
        audit.flag(MISMATCH, f"validation clients {shared[:5]} are training clients too")
    checks = {"delta": (parsed.delta, ledger.delta), "unit": (parsed.unit, ledger.unit),
              "noise": (parsed.family.name, ledger.noise)}
    first = next((other for other in run_ledgers if other is not None), None)
    if first is not None:
        checks["trust"] = (parsed.trust, first.trust)
        checks["noise_source"] = (parsed.noise_source, "run_seed" if first.noise_source == "run_seed" else "run_key")
    if rebuilt is not None and rebuilt.validation_plan is not None:
        expected = rebuilt.validation_plan.to_dict()
        for name in ("clients", "records", "min_inputs", "colluders", "mu", "l1", "l2", "scale", "sample_rate",
                     "delta", "modulus_bits"):
            checks[f"phases.validation.{name}"] = (getattr(plan, name), expected[name])
        checks["validation clients"] = (len(parsed.clients), rebuilt.validation_plan.clients)
    for name, (theirs, ours) in checks.items():
        same = math.isclose(theirs, ours, rel_tol=1e-9) if isinstance(ours, float) and isinstance(theirs, (int, float)) \
            else theirs == ours
        if not same:
            audit.flag(MISMATCH, f"{ledger.validation_ledger}'s {name} is {theirs!r}; the run's is {ours!r}")


__all__ = ["CANDIDATE_FAILS", "TAMPERED", "TuningAudit", "audit_tuning", "is_tuning_run"]
