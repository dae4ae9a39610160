"""``privfer tune``: private hyperparameter selection within the run's total budget (privfer.fl.tuning)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from privfer.cli.common import (ConfigOption, DataOption, JsonOption, OutOption, SetOption, app, console, errors,
                                resolve_config, run_directory, user_errors)
from privfer.cli.render import report_table


@app.command()
@user_errors
def tune(
    epsilon: Optional[float] = typer.Option(
        None, "--epsilon", "-e", help="TOTAL per-client budget: every candidate and the selection together."),
    tries: Optional[List[str]] = typer.Option(
        None, "--try", "-t", help="A setting and its candidate values, e.g. federation.server_lr=0.02,0.05,0.1 "
        "(repeatable; the candidates are every combination; default: the config's model.readout, then "
        "the first of mean and last that differs from it, at the server step the config resolves)."),
    validation: Optional[str] = typer.Option(
        None, "--validation", help="private (default under DP: noisy counts through the secure sum, in the ledger) "
        "or consenting (exact validation macro F1; the validation actors are not covered)."),
    pilot_share: Optional[float] = typer.Option(
        None, "--pilot-share", help="Under DP, with two or more candidates: the share of --epsilon the candidates "
        "spend together (each is a pilot); the chosen settings are then trained once more with what RDP composition "
        "leaves, and that final run is the result. 1: no final run, the chosen candidate is the result. Default 0.4."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Run seed."),
    config: Optional[Path] = ConfigOption,
    data: Optional[Path] = DataOption,
    overrides: Optional[List[str]] = SetOption,
    out: Optional[Path] = OutOption,
    as_json: bool = JsonOption,
) -> None:
    """Train every candidate of a declared search space under the run's mechanism, release each one's validation
    score privately, keep the best; the ledger charges every candidate (privfer audit checks it)."""
    from privfer.fl.tuning import parse_space, tune as run_tune

    cfg = resolve_config(config, overrides, data, **{"privacy.epsilon": epsilon, "seed": seed})
    space = parse_space(tries)

    def on_start(plan: Any) -> None:
        if as_json:
            return
        count = len(plan.candidates)
        if plan.final:
            low, high = min(plan.final_budgets), max(plan.final_budgets)
            final = f"{low:.3f}" if math.isclose(low, high) else f"{low:.3f} to {high:.3f}"
            errors.print(f"tuning: {count} candidates, each trained at epsilon {plan.budget:.3f} (together "
                         f"{plan.composed:.3f}, the pilot share {plan.pilot_share:g} of {cfg.privacy.epsilon:g}), then "
                         f"the chosen settings once more at epsilon {final}: all composed stay within "
                         f"{cfg.privacy.epsilon:g} (worst case {max(plan.final_composed):.3f}, delta "
                         f"{plan.delta:.3g}); validation scores: {plan.validation}",
                         highlight=False, markup=False)
        elif plan.budget is not None:
            errors.print(f"tuning: {count} candidates, each trained at epsilon {plan.budget:.3f} so that all {count} "
                         f"composed stay within {cfg.privacy.epsilon:g} (worst case {plan.composed:.3f}, delta "
                         f"{plan.delta:.3g}); validation scores: {plan.validation}", highlight=False, markup=False)
        else:
            errors.print(f"tuning: {count} candidates without DP; validation scores exact", highlight=False,
                         markup=False)

    def on_candidate(candidate: Any, score: float, test: dict) -> None:
        if not as_json:
            errors.print(f"candidate {candidate.index} ({_settings(candidate.settings)}): released score {score:.3f}",
                         highlight=False,
                         markup=False)

    def on_final(final: Any) -> None:
        if not as_json:
            errors.print(f"final run of the chosen settings at epsilon {final.privacy.epsilon:.3f}", highlight=False,
                         markup=False)

    with run_directory(out, cfg, "tune") as run_dir:
        result = run_tune(cfg, space, run_dir, validation=validation, pilot_share=pilot_share, on_start=on_start,
                          on_candidate=on_candidate, on_final=on_final)
    if as_json:
        console.print_json(json.dumps(result.to_json()))
        return
    print_tune(result, run_dir)


def _settings(settings: dict[str, Any]) -> str:
    """``server_lr=0.05, readout=last``: the field names alone where they are unambiguous."""
    short = [key.split(".")[-1] for key in settings]
    names = short if len(set(short)) == len(short) else list(settings)
    return ", ".join(f"{name}={value}" for name, value in zip(names, settings.values()))


def print_tune(result: Any, run_dir: Path) -> None:
    table = Table(title="candidates (score: what was released; the exact column is the simulation's view, never "
                        "released or used to choose)", title_justify="left")
    for column in ("#", "settings", "released score", "val macro F1 (exact)"):
        table.add_column(column, justify="left" if column == "settings" else "right")
    for candidate in result.candidates:
        mark = " *" if candidate["index"] == result.chosen else ""
        table.add_row(f"{candidate['index']}{mark}", _settings(candidate["settings"]),
                      f"{candidate['score']:.3f}", f"{candidate['validation_macro_f1']:.3f}")
    console.print(table)
    released = (f"final run of candidate {result.chosen}'s settings" if result.final_epsilon is not None
                else f"chosen candidate {result.chosen}")
    console.print(report_table(result.test, f"{released}: test actors"))
    if result.target_epsilon is not None:
        final = (f", the final run {result.final_epsilon:.3f}" if result.final_epsilon is not None else "")
        runs = f"all {len(result.candidates)}" + (" and the final run" if result.final_epsilon is not None else "")
        console.print(f"epsilon {result.target_epsilon:g} in total: each candidate {result.candidate_epsilon:.3f}"
                      f"{final}, training clients composed over {runs} max {result.epsilon_max:.3f}, "
                      + (f"validation clients max {result.validation_epsilon_max:.3f}"
                         if result.validation_epsilon_max is not None else "validation actors not covered (consenting)")
                      + f", delta {result.delta:.3g}", highlight=False, markup=False)
    console.print(f"wrote {run_dir}/result.json and tuning_ledger.json (check it: privfer audit {run_dir})",
                  highlight=False, markup=False)
