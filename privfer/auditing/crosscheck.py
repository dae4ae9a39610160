"""Audit the run, not only the ledger: cross-check a ledger against its run directory's config and rounds.

A ledger recomputes on its own — but a ledger whose entries were deleted,
duplicated, or edited consistently (sample rate, steps, delta and epsilon
changed together) recomputes too. The run directory also holds
``config.yaml`` (the resolved config the run was made with) and
``rounds.json`` (who took part in which round, as the server saw it), so
:func:`cross_check` holds the ledger to them: the unit, the mechanism, the
target, delta and the planned sample rates and steps come from the config;
the set of clients and how often each trained come from the rounds; and
the run's federation is rebuilt from the config and its data (the split,
every client's record count, the delta and every calibrated plan, by the
code the run ran), to which every entry and every distributed plan is held
field by field (noise, scale, sensitivities, trust sizing, bounds). Every
disagreement is one line in the result. A ledger without its run directory
cannot be cross-checked, and the audit says so.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from privfer.config import load_config
from privfer.errors import PrivferError
from privfer.privacy.calibrate import steps_per_epoch
from privfer.privacy.ledger import LOCAL, Ledger, OpacusLedger, SecureSumLedger, mechanism_of
from privfer.privacy.ledger.opacus import NO_DP_SENTENCES

MAX_ROUNDS_BYTES = 256 * 1024 * 1024


def _close(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return False


def cross_check(ledger: Ledger, run_dir: Path) -> list[str] | None:
    """Inconsistencies between ``ledger`` (validated) and the run in ``run_dir``; None when the run files are
    absent."""
    config_path, rounds_path = run_dir / "config.yaml", run_dir / "rounds.json"
    if not config_path.is_file() or not rounds_path.is_file():
        return None
    try:
        config = load_config(config_path)
    except PrivferError as exc:
        return [f"config.yaml does not load: {exc}"]
    if rounds_path.stat().st_size > MAX_ROUNDS_BYTES:
        return [f"rounds.json is {rounds_path.stat().st_size} bytes; at most {MAX_ROUNDS_BYTES} are read"]
    try:
        rounds = json.loads(rounds_path.read_text(encoding="utf-8"))
        trained = Counter((str(r["phase"]), int(c)) for r in rounds for c in r["clients"])
        phases = Counter(str(r["phase"]) for r in rounds)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        return [f"rounds.json is not a privfer rounds file ({exc.__class__.__name__})"]

    problems: list[str] = []
    privacy, fed = config.privacy, config.federation

    def expect(what: str, found: Any, wanted: Any, *, numeric: bool = False) -> None:
        same = _close(found, wanted) if numeric and found is not None and wanted is not None else found == wanted
        if not same:
            problems.append(f"{what} is {found!r} in the ledger but {wanted!r} in the run's config")

    expect("the unit", ledger.unit, privacy.unit)
    expect("the noise source", ledger.noise_source, privacy.noise_source)  # 'run_seed' makes every share public
    expect("the mechanism", mechanism_of(ledger), config.mechanism_id or LOCAL)  # without DP: a local ledger
    expect("'private'", ledger.private, privacy.enabled)
    if not ledger.private and not privacy.enabled and ledger.mechanism in NO_DP_SENTENCES:  # (older: not said)
        expect("how the run trained", NO_DP_SENTENCES[ledger.mechanism], config.trained_by)
    expect("the target epsilon", ledger.target_epsilon, privacy.epsilon if privacy.enabled else None,
           numeric=True)
    if privacy.delta is not None:
        expect("delta", ledger.delta, privacy.delta, numeric=True)
    person = ledger.unit == "person"
    # the clipping bound of the protected unit: a record's gradient, or (person) a client's whole update
    expect("max_grad_norm", ledger.max_grad_norm, privacy.max_update_norm if person else privacy.max_grad_norm,
           numeric=True)
    max_rounds = {"training": fed.rounds, "adaptation": fed.adaptation_rounds}
    # what the run leaves outside the accounting: the IFER when it pseudo-labelled the adaptation phase unpretrained
    from privfer.fl.simulation import IFER_NOT_COVERED  # (torch: only with a run to hold the ledger to)

    expect("not_covered", ledger.not_covered,
           [IFER_NOT_COVERED] if phases.get("adaptation") and config.model.ifer_weights is None else [])
    for phase, count in phases.items():
        if count > max_rounds.get(phase, 0):
            problems.append(f"rounds.json records {count} {phase} rounds; the config plans {max_rounds.get(phase, 0)}")

    entries = ledger.clients
    keys = Counter((e.phase, e.client) for e in entries)
    duplicated = sorted(k for k, n in keys.items() if n > 1)
    if duplicated:
        problems.append(f"{len(duplicated)} clients have more than one entry (first: {duplicated[0]})")
    missing = sorted(set(trained) - set(keys))
    if missing:
        problems.append(f"{len(missing)} clients trained (rounds.json) but have no ledger entry "
                        f"(first: client {missing[0][1]}, {missing[0][0]})")
    extra = sorted(set(keys) - set(trained))
    if extra:
        problems.append(f"{len(extra)} ledger entries are for clients that never trained (first: client "
                        f"{extra[0][1]}, {extra[0][0]})")
    if isinstance(ledger, SecureSumLedger):
        for phase, plan in ledger.phases.items():
            expect(f"the {phase} plan's steps", plan.steps, max_rounds.get(phase))
            expect(f"the {phase} plan's sample rate", plan.sample_rate,
                   privacy.participation if person else privacy.sample_rate, numeric=True)
            expect(f"the {phase} plan's clipping bound", plan.max_grad_norm,
                   privacy.max_update_norm if person else privacy.max_grad_norm, numeric=True)
    epochs = {"training": fed.local_epochs, "adaptation": fed.adaptation_epochs}
    for entry in entries:
        key = (entry.phase, entry.client)
        where = f"client {key[1]} ({key[0]})"
        if key in trained and entry.rounds_trained != trained[key]:
            problems.append(f"{where}: rounds_trained {entry.rounds_trained!r}, but rounds.json has it in "
                            f"{trained[key]} rounds")
        expect(f"{where}: max_rounds", entry.max_rounds, max_rounds.get(key[0]))
        if not isinstance(ledger, OpacusLedger) or not privacy.enabled:
            continue
        if entry.records < 1:
            problems.append(f"{where}: records {entry.records!r} is not a count")
            continue
        per_epoch = steps_per_epoch(entry.records, config.training.batch_size)
        expect(f"{where}: the sample rate", entry.sample_rate, 1.0 / per_epoch, numeric=True)
        planned = entry.rounds_trained * epochs.get(key[0], 0) * per_epoch
        expect(f"{where}: steps", entry.steps, planned)
    return problems + _check_federation(ledger, config)


def _check_federation(ledger: Ledger, config: Any) -> list[str]:
    """Rebuild the run's federation from config.yaml and its data — the split, the clients and their record
    counts, the delta and every calibrated plan, by the code the run itself ran — and hold each entry to it: a
    ledger edited consistently with its own records, persons or noise multipliers (a stronger delta judged, a
    smaller epsilon claimed) recomputes, and even recalibrates, on its own; the run's data says otherwise."""
    from privfer.fl.simulation import prepare_federation  # (torch: only with a run to hold the ledger to)

    try:
        federation = prepare_federation(config)
    except Exception as exc:  # noqa: BLE001 - the data is not here, or not the run's: a finding, not a crash
        return [f"the run's federation cannot be rebuilt from config.yaml and its data to verify the record "
                f"counts and plans ({exc.__class__.__name__}: {str(exc)[:200]}); audit where the run's data is"]
    problems: list[str] = []
    if ledger.private and not _close(ledger.delta, federation.delta):  # without DP a delta bounds nothing
        problems.append(f"delta is {ledger.delta!r} in the ledger but {federation.delta:.6g} for the run's data")
    if isinstance(ledger, SecureSumLedger) and ledger.persons is not None:
        persons = sum(len(group) for group in federation.clients.values())
        if ledger.persons != persons:
            problems.append(f"the ledger's persons is {ledger.persons}, but the run's data has {persons}")
    plans = federation.plans
    for entry in ledger.clients:
        where = f"client {entry.client} ({entry.phase})"
        client = federation.clients.get(entry.phase, {}).get(entry.client)
        if client is None:
            problems.append(f"{where} is not a client of that phase in the run's data")
            continue
        if entry.records is not None and entry.records != client.records:
            problems.append(f"{where}: records {entry.records} in the ledger, {client.records} in the run's data")
        if isinstance(ledger, OpacusLedger) and ledger.private:
            plan = plans.get(entry.phase, {}).get(entry.client)
            if plan is None:
                problems.append(f"{where} has no calibrated plan in the rebuilt run")
                continue
            for name in ("noise_multiplier", "sample_rate"):
                if not _close(getattr(entry, name), getattr(plan, name)):
                    problems.append(f"{where}: {name} {getattr(entry, name)!r} in the ledger, "
                                    f"{getattr(plan, name)!r} calibrated for the run's data")
    if isinstance(ledger, SecureSumLedger):
        for phase, plan in ledger.phases.items():
            expected = plans.get(phase)
            if expected is None:
                problems.append(f"the ledger has a {phase} plan the rebuilt run does not")
                continue
            stated = plan.noise or ledger.family.name  # absent: read as the audit reads it
            if stated != expected.noise:
                problems.append(f"the {phase} plan's noise family is {stated!r} in the ledger but the run's config "
                                f"uses {expected.noise!r}")
            for name in _RECOMPUTED:
                if not _close(getattr(plan, name), getattr(expected, name)):
                    problems.append(f"the {phase} plan's {name} is {getattr(plan, name)!r} in the ledger but "
                                    f"{getattr(expected, name)!r} in the run rebuilt from its data")
    return problems


_RECOMPUTED = ("dimension", "scale", "l1", "l2", "mu", "share_variance", "min_inputs", "colluders", "sum_bound",
               "records", "clients", "modulus_bits", "target_epsilon", "sample_rate", "steps", "max_grad_norm", "delta")


__all__ = ["cross_check"]
