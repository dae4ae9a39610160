"""``privfer audit`` (recompute a run's epsilons) and ``privfer canary-audit`` (empirical lower bounds with canaries).

Thin commands over :mod:`privfer.auditing` (the ledger, then its run) and :mod:`privfer.auditing.empirical`.
``privfer audit --empirical ...`` still works and says, on stderr, that it is
now ``privfer canary-audit``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from privfer.cli.common import (ConfigOption, DataOption, SetOption, UsageError, _nothing, app, console, errors,
                                print_error, resolve_config)
from privfer.errors import PrivferError

DEPRECATED = "privfer audit --empirical is deprecated and will be removed: use privfer canary-audit (same options)"


@app.command()
def audit(
    run: Optional[Path] = typer.Argument(None, help="A run directory (or its privacy_ledger.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the audit as JSON."),
    per_client: Optional[bool] = typer.Option(
        None, "--per-client/--summary", help="One row per client (default up to 20 clients) or min/median/max."
    ),
    # the canary audit's options, kept for the old spelling `privfer audit --empirical` (hidden; see canary-audit)
    empirical: bool = typer.Option(False, "--empirical", hidden=True),
    kind: str = typer.Option("whitebox", "--kind", hidden=True),
    canaries: int = typer.Option(1000, "--canaries", hidden=True),
    guesses: int = typer.Option(100, "--guesses", hidden=True),
    seeds: int = typer.Option(1, "--seeds", hidden=True),
    sweep: Optional[str] = typer.Option(None, "--sweep", hidden=True),
    plot: Optional[Path] = typer.Option(None, "--plot", hidden=True),
    audit_delta: float = typer.Option(1e-5, "--audit-delta", hidden=True),
    epsilon: Optional[float] = typer.Option(
        None, "--epsilon", "-e", help="The budget the run was promised: the audit fails (MISMATCH) unless the "
        "ledger's target is this (a ledger relabelled at a smaller target otherwise reads as a genuine smaller run)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", hidden=True),
    data: Optional[Path] = typer.Option(None, "--data", hidden=True),
    overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", hidden=True),
) -> None:
    """Check a run's privacy budget: recompute every client's epsilon (exit 0 pass, 1 fail, 2 unusable input)."""
    try:
        if empirical:
            errors.print(DEPRECATED, highlight=False, markup=False, soft_wrap=True)
            passed = run_empirical_audit(run, as_json, kind, canaries, guesses, seeds, sweep, plot, audit_delta,
                                         epsilon, config, data, overrides)
        else:
            if run is None:
                raise UsageError("privfer audit needs a run directory (the canary audit is privfer canary-audit)")
            from privfer.auditing import audit_path
            from privfer.auditing.tuning import audit_tuning, is_tuning_run

            if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
                raise UsageError(f"--epsilon must be a finite positive budget, got {epsilon:g}")
            if is_tuning_run(run):
                tuning = audit_tuning(run, promised=epsilon)
                if as_json:
                    console.print_json(json.dumps(tuning.to_dict()))
                else:
                    print_tuning_audit(tuning)
                raise typer.Exit(0 if tuning.passed else 1)

            report = audit_path(run)
            broken = None  # the promise (--epsilon) the ledger's target does not keep
            if epsilon is not None and (report.target is None or abs(report.target - epsilon) > 1e-9 * epsilon):
                broken = f"the ledger's target epsilon is {report.target}, not the promised {epsilon:g}"
            if report.unauditable:
                first = report.unauditable[0]
                raise UsageError(f"{report.ledger}: {len(report.unauditable)} entries are UNAUDITABLE (client "
                                 f"{first.client}: {first.reasons[0]}); the ledger was not produced by this run's "
                                 "plan or is damaged")
            if as_json:
                promise = {} if epsilon is None else {"promised": {"epsilon": epsilon, "kept": broken is None}}
                console.print_json(json.dumps({**report.to_dict(), **promise}))
            else:
                print_audit(report, per_client if per_client is not None else len(report.clients) <= 20, broken)
            passed = report.passed and broken is None
    except (PrivferError, ValueError) as exc:
        print_error(str(exc))
        raise typer.Exit(2) from None
    raise typer.Exit(0 if passed else 1)


@app.command("canary-audit")
def canary_audit(
    run: Optional[Path] = typer.Argument(None, help="A run directory: audit its config (else --config/--set)."),
    as_json: bool = typer.Option(False, "--json", help="Print the audit as JSON."),
    kind: str = typer.Option("whitebox", "--kind", help="Canaries: whitebox (gradients), blackbox (clips), both."),
    canaries: int = typer.Option(1000, "--canaries", help="Canaries m (each included with probability 1/2)."),
    guesses: int = typer.Option(100, "--guesses", help="Guesses r (half 'in', half 'out'; even)."),
    seeds: int = typer.Option(1, "--seeds", help="Audit runs per setting."),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="Epsilons to audit, e.g. 1,4,inf (inf: DP off)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of lower bound vs claimed epsilon."),
    audit_delta: float = typer.Option(1e-5, "--audit-delta", help="Delta of the bound and of the claim."),
    epsilon: Optional[float] = typer.Option(None, "--epsilon", "-e", help="Without RUN: the epsilon to audit."),
    config: Optional[Path] = ConfigOption,
    data: Optional[Path] = DataOption,
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """One training run with canaries: empirical lower bounds on epsilon against the claim (exit 0 none above it,
    1 a violation, 2 unusable input)."""
    try:
        passed = run_empirical_audit(run, as_json, kind, canaries, guesses, seeds, sweep, plot, audit_delta, epsilon,
                                     config, data, overrides)
    except (PrivferError, ValueError) as exc:
        print_error(str(exc))
        raise typer.Exit(2) from None
    raise typer.Exit(0 if passed else 1)


def _epsilons(text: str) -> list[Optional[float]]:
    values: list[Optional[float]] = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            value = float(part)
        except ValueError:
            raise UsageError(f"--sweep takes numbers or inf separated by commas, got {part!r}") from None
        if not value > 0:
            raise UsageError(f"--sweep epsilons must be > 0, got {part}")
        values.append(None if value == float("inf") else value)
    return values


def run_empirical_audit(run, as_json, kind, canaries, guesses, seeds, sweep, plot, audit_delta, epsilon, config,
                        data, overrides) -> bool:
    from privfer.auditing.empirical import KINDS, audit_ceiling, plot_sweep, run_sweep
    from privfer.config import load_config
    from privfer.data import load_clips

    kinds = KINDS if kind == "both" else (kind,)
    if kind != "both" and kind not in KINDS:
        raise UsageError(f"--kind must be whitebox, blackbox or both, got {kind!r}")
    if canaries < 2 or not 2 <= guesses <= canaries or guesses % 2 or seeds < 1:
        raise UsageError(f"need 2 <= --guesses (even) <= --canaries and --seeds >= 1, got {guesses}, {canaries}, "
                         f"{seeds}")
    if not 0 < audit_delta < 1:
        raise UsageError(f"--audit-delta must be in (0, 1), got {audit_delta}")
    if run is not None:
        folder = run if run.is_dir() else run.parent
        if not (folder / "config.yaml").is_file():
            raise UsageError(f"{folder} holds no config.yaml (a privfer simulate run directory does)")
        cfg = load_config(folder / "config.yaml", [f"privacy.epsilon={epsilon}"] if epsilon else [])
    else:
        cfg = resolve_config(config, overrides, data, **{"privacy.epsilon": epsilon})
    if sweep is not None and not sweep.strip():
        raise UsageError("--sweep takes epsilons separated by commas (e.g. 1,4,inf), got an empty list")
    epsilons = _epsilons(sweep) if sweep else [cfg.privacy.epsilon if cfg.privacy.enabled else None]
    ceiling = audit_ceiling(canaries, guesses, audit_delta)
    if not as_json:
        errors.print(f"{canaries} canaries, {guesses} guesses, delta {audit_delta:g}: the largest lower bound this "
                     f"audit can certify is {ceiling:.2f}", highlight=False, markup=False)
    clips = load_clips(cfg.data)
    results = []
    with errors.status("training with canaries", spinner="dots") if not as_json else _nothing():
        results = run_sweep(cfg, epsilons, kinds=kinds, seeds=seeds, canaries=canaries, guesses=guesses,
                            clips=clips, delta=audit_delta)
    violations = [r for r in results if r.claimed_epsilon is not None and r.epsilon_lower_bound > r.claimed_epsilon]
    if plot is not None:
        plot_sweep(results, plot)
    if as_json:
        console.print_json(json.dumps({"ceiling": ceiling, "passed": not violations,
                                       "audits": [r.to_dict() for r in results]}))
        return not violations
    first = results[0]  # person level: the canaries are whole persons, no client's clips
    who = f"client {first.client}, {first.records} clips" if first.records else "the canaries are whole persons"
    table = Table(title=f"one-run canary audit ({who}; delta {audit_delta:g})", title_justify="left")
    for column in ("canaries", "epsilon claimed", "sigma", "steps", "correct", "lower bound", "verdict"):
        table.add_column(column, justify="left" if column in ("canaries", "verdict") else "right")
    for r in results:
        claimed = "inf (DP off)" if r.claimed_epsilon is None else f"{r.claimed_epsilon:.3f}"
        verdict = "VIOLATION" if r in violations else ("power" if r.claimed_epsilon is None else "ok")
        table.add_row(r.kind, claimed, f"{r.noise_multiplier:.3f}", str(r.steps), f"{r.correct}/{r.guesses}",
                      f"{r.epsilon_lower_bound:.3f}", verdict)
    console.print(table)
    console.print(
        ("FAIL: an empirical lower bound exceeds the claimed epsilon" if violations else
         "PASS: no empirical lower bound exceeds the claimed epsilon")
        + f" (ceiling {ceiling:.2f}); a bound below the claim is what DP promises, not a proof of it."
        + (f" Plot: {plot}" if plot is not None else ""),
        highlight=False, markup=False,
    )
    return not violations


def print_tuning_audit(audit: Any) -> None:
    """A tuning run's audit: the candidates charged, the composition recomputed, the verdict."""
    target = "none (no DP)" if audit.target is None else f"{audit.target:g}"
    lines = [f"tuning audit of {audit.ledger}: target epsilon {target} for the whole tuning run",
             f"candidates listed {audit.candidates}, declared by the search space {audit.declared}"]
    if audit.epsilon_max is not None:
        runs = "every candidate and the final run" if audit.final else "every candidate"
        lines.append(f"training clients: epsilon composed over {runs}, recomputed twice: max "
                     f"{audit.epsilon_max:.3f} over {len(audit.clients)} clients")
    if audit.validation is not None:
        top = max((c.certified or 0.0 for c in audit.validation.clients), default=0.0)
        lines.append(f"validation clients: the score releases' epsilon max {top:.3f}")
    for line in lines:
        console.print(line, highlight=False, markup=False)
    if audit.passed:
        console.print("verdict: PASS", highlight=False, markup=False)
        return
    console.print(f"verdict: FAIL ({', '.join(audit.verdicts)})", highlight=False, markup=False)
    for reason in audit.reasons[:20]:
        console.print(f"  - {reason}", highlight=False, markup=False)


def print_audit(report: Any, per_client: bool, broken: str | None = None) -> None:
    """The audit's table and verdict; ``broken``: why the ledger's target is not the promised budget."""
    from privfer.privacy.audit import TITLES as names

    distributed = report.noise_in_sum
    columns = report.columns
    target = "none (no DP)" if report.target is None else f"{report.target:g}"
    title = f"privacy audit of {report.ledger}: target epsilon {target}, ledger accountant {report.accountant}"
    table = Table(title=title, title_justify="left")
    if per_client:
        for column in ("client", "phase", "records", "delta", "claimed"):
            table.add_column(column, justify="right" if column not in ("phase",) else "left")
        for name in columns:
            table.add_column(names[name], justify="right")
        if distributed:
            table.add_column(names["gaussian_floor"], justify="right")
        table.add_column("verdict")
        for client in report.clients:
            claimed = "-" if client.claimed is None else f"{client.claimed:.3f}"
            verdict = ", ".join(client.verdicts) or "ok"
            table.add_row(str(client.client), client.phase, str(client.records), f"{client.delta:.3g}", claimed,
                          *(f"{client.values[n]:.3f}" if n in client.values else ("-" if client.values else "inf")
                            for n in columns),
                          *([f"{client.floor:.3f}" if client.floor is not None else "-"] if distributed else []),
                          escape(verdict))
    else:
        table.add_column("epsilon over clients")
        for column in ("min", "median", "max"):
            table.add_column(column, justify="right")
        for name, row in report.summary().items():
            table.add_row(names.get(name, name), *(f"{row[k]:.3f}" for k in ("min", "median", "max")))
    console.print(table)
    counts = report.verdict_counts()
    if not report.private:
        console.print("the run trained WITHOUT DP: no client has a finite epsilon", highlight=False, markup=False)
    else:
        for client in report.clients:
            for reason in client.reasons:
                console.print(f"client {client.client} ({client.phase}): {reason}", highlight=False, markup=False)
    if report.run_checks is None:
        console.print("not cross-checked: no config.yaml and rounds.json next to the ledger (audit the run "
                      "directory to check who trained, the plan and the target against the run)",
                      highlight=False, markup=False)
    else:
        for problem in report.run_checks:
            console.print(f"INCONSISTENT WITH THE RUN: {problem}", highlight=False, markup=False)
    if broken is not None:
        console.print(f"NOT THE PROMISED BUDGET: {broken}", highlight=False, markup=False)
    status = "PASS" if report.passed and broken is None else "FAIL"
    console.print(
        f"{status}: {len(report.clients)} clients; "
        + ", ".join(f"{name} {count}" for name, count in counts.items())
        + (". Both implementations of the noise's bound must agree and stay within the target; the Gaussian with "
           "the same variance (dp-accounting PLD) is a floor the bound can never be below. Tolerances: "
           "docs/auditing.md." if distributed else
           ". The tightest of the four sound bounds must not exceed the target; RDP alone above it is expected "
           "(RDP is looser than PRV/PLD). Tolerances: docs/auditing.md."),
        highlight=False, markup=False,
    )
