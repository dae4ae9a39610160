"""``privfer simulate``: a federated run, private by default where a budget is given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from privfer.cli.common import (ConfigOption, DataOption, JsonOption, OutOption, SetOption, app, console, errors,
                                resolve_config, run_directory, user_errors)
from privfer.cli.render import describe_privacy, print_simulation


@app.command()
@user_errors
def simulate(
    epsilon: Optional[float] = typer.Option(
        None, "--epsilon", "-e", help="TOTAL per-client budget for the whole run (record level); inf: no DP."
    ),
    delta: Optional[float] = typer.Option(None, "--delta", help="Delta (default 1 / (10 x records per client))."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="fedavg, fedper, fedprox, amy (options: --set federation.strategy_options.mu=0.01)."),
    aggregator: Optional[str] = typer.Option(
        None, "--aggregator", help="masking (SecAgg, default), ckks, or plain (NOT private: a baseline)."
    ),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Federated training rounds."),
    clients_per_round: Optional[int] = typer.Option(None, "--clients-per-round", help="Clients sampled per round."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Chance a sampled client drops out, 0 to <1."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Run seed."),
    config: Optional[Path] = ConfigOption,
    data: Optional[Path] = DataOption,
    overrides: Optional[List[str]] = SetOption,
    out: Optional[Path] = OutOption,
    as_json: bool = JsonOption,
) -> None:
    """Federated VFER training with DP-SGD clients and secure aggregation; prints what the budget bought."""
    from privfer.fl.simulation import simulate as run_simulation

    settings = {
        "privacy.epsilon": epsilon, "privacy.delta": delta, "federation.strategy": strategy,
        "aggregation.backend": aggregator, "federation.rounds": rounds,
        "federation.clients_per_round": clients_per_round, "federation.dropout": dropout, "seed": seed,
    }
    cfg = resolve_config(config, overrides, data, **settings)
    # loading the clips, the pseudo labels and the noise calibration come before round 1: say so while they run
    # (a transient status line: nothing is left behind, so an error is still one line)
    preparing = errors.status(f"preparing: {cfg.data.source} data, "
                              + (f"calibrating {cfg.mechanism} DP noise for epsilon {cfg.privacy.epsilon:g}"
                                 if cfg.privacy.enabled else "no DP"))
    if not as_json:
        preparing.start()
    progress = Progress(
        TextColumn("[bold]{task.fields[phase]} round"), MofNCompleteColumn(), BarColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=errors, disable=as_json,
        # redrawn at each round's update, by this thread: no refresh thread runs while the round's clients fork
        # (privfer.secagg.hosts forks only a process without other Python threads)
        auto_refresh=False,
    )
    task = progress.add_task("simulate", total=1, status="", phase="", start=False)

    def on_start(federation: Any, done: int, total: int) -> None:
        preparing.stop()
        if not as_json:
            for line in describe_privacy(federation):
                errors.print(line, highlight=False, markup=False)
            if done:
                errors.print(f"resuming: {done} of {total} rounds are done (checkpoint verified)", highlight=False,
                             markup=False)
            if federation.config.federation.adaptation and not federation.clients["adaptation"]:
                errors.print("adaptation (phase 2) skipped: fewer than two test actors kept a pseudo label above "
                             f"data.pseudo_label_threshold = {federation.config.data.pseudo_label_threshold:g}",
                             highlight=False, markup=False)
        progress.start()
        progress.start_task(task)
        progress.update(task, total=total, completed=done, phase="training", refresh=True)

    def on_round(record: Any) -> None:
        loss = "-" if record.train_loss is None else f"{record.train_loss:.3f}"
        val = "" if record.val_macro_f1 is None else f"  val macro-F1 {record.val_macro_f1:.3f}"
        note = f"  ABORTED: {record.aborted}" if record.aborted else ""
        progress.update(
            task, advance=1, phase=record.phase,
            status=f"{len(record.included)}/{len(record.clients)} clients  loss {loss}{val}{note}", refresh=True,
        )

    try:
        with run_directory(out, cfg, "simulate") as run_dir:
            result = run_simulation(cfg, run_dir, on_start=on_start, on_round=on_round)
    finally:
        preparing.stop()
        if progress.live.is_started:  # stopping a progress bar never shown prints an empty line before the error
            progress.stop()
    if as_json:
        console.print_json(json.dumps(result.to_json()))
        return
    print_simulation(result, run_dir)
