"""``privfer train``: the centralized, non-private baseline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from privfer.cli.common import (ConfigOption, DataOption, JsonOption, OutOption, SetOption, _nothing, app, console,
                                errors, resolve_config, run_directory, user_errors)
from privfer.cli.render import report_table


@app.command()
@user_errors
def train(
    labels: Optional[str] = typer.Option(None, "--labels", help="partial (KL to vote distributions) or discrete."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (default 20)."),
    config: Optional[Path] = ConfigOption,
    data: Optional[Path] = DataOption,
    overrides: Optional[List[str]] = SetOption,
    out: Optional[Path] = OutOption,
    as_json: bool = JsonOption,
) -> None:
    """Train the VFER centrally (non-private baseline) and print the seed paper's metrics table."""
    from privfer.centralized import train_centralized
    from privfer.data import load_clips

    cfg = resolve_config(config, overrides, data, **{"training.labels": labels, "training.epochs": epochs})
    with errors.status("loading clips", spinner="dots") if not as_json else _nothing():
        clips = load_clips(cfg.data)
    progress = Progress(
        TextColumn("[bold]epoch"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), console=errors, disable=as_json,
    )
    task = progress.add_task("train", total=cfg.training.epochs, status="", start=False)

    def on_start(first_epoch: int) -> None:
        # The bar appears only once training really starts, so an early error stays one line.
        progress.start()
        progress.start_task(task)
        progress.update(task, completed=first_epoch - 1)

    def on_epoch(record: Any) -> None:
        progress.update(
            task, completed=record.epoch,
            status=f"train {record.train_loss:.3f}  val {record.val_loss:.3f}  val macro-F1 {record.val_macro_f1:.3f}",
        )

    try:
        with run_directory(out, cfg, "train") as run_dir:
            result = train_centralized(cfg, run_dir=run_dir, on_epoch=on_epoch, on_start=on_start, clips=clips)
    finally:
        progress.stop()
    if as_json:
        console.print_json(json.dumps(result))
        return
    console.print(
        report_table(
            result["test"],
            f"VFER, {result['labels']} labels: test actors' evaluation halves "
            f"(best epoch {result['best_epoch']}, target: {result['eval_target']} emotion)",
        )
    )
    pseudo = result["pseudo_labels"]
    console.print(
        f"IFER pseudo labels on the adaptation halves: {pseudo['kept']} of {pseudo['clips']} clips kept "
        f"(top probability > {pseudo['threshold']}), {pseudo['accuracy_of_kept']:.1%} of them correct",
        highlight=False,
    )
    console.print(f"took {result['seconds']:.1f} s; wrote {run_dir}/result.json", highlight=False, markup=False)
