"""``privfer study``: a grid of runs, resumable, and its tables and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from privfer.cli.common import UsageError, app, console, errors, print_error, user_errors
from privfer.cli.render import study_table


@app.command()
@user_errors
def study(
    target: str = typer.Argument(..., help="A study spec (YAML), or 'report' to rebuild a study's tables."),
    directory: Optional[Path] = typer.Argument(None, help="With 'report': the study directory."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Study directory (default runs/study-<name>)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Parallel worker processes (default: spec)."),
) -> None:
    """Run a privacy-utility study (every grid cell a simulate run; re-run to resume), or `study report DIR`."""
    from privfer.study import load_spec, run_study, write_report
    from privfer.study.report import report_files

    if target == "report":
        if directory is None:
            raise UsageError("privfer study report needs the study directory")
        spec_path = directory / "spec.yaml"
        if not spec_path.is_file():
            raise UsageError(f"{directory} is not a study directory (no spec.yaml)")
        spec, cells = load_spec(spec_path)
        rows = write_report(cells, directory, spec.name)
        console.print(study_table(directory))
        console.print(f"{len(rows)} of {len(cells)} cells finished; wrote in {directory}: {report_files(directory)}",
                      highlight=False, markup=False)
        return
    if directory is not None:
        raise UsageError("give the study directory with --out (a second argument is only for 'report')")
    if workers is not None and not 1 <= workers <= 64:
        raise UsageError(f"--workers must be between 1 and 64, got {workers}")
    spec, cells = load_spec(Path(target))
    folder = out if out is not None else cells[0].config.output.dir / f"study-{spec.name}"
    from privfer.study.runner import spec_yaml

    if (folder / "spec.yaml").is_file() and (folder / "spec.yaml").read_text(encoding="utf-8") != spec_yaml(spec):
        raise UsageError(f"{folder} holds a study with another spec; choose another --out")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"study directory {folder} cannot be used: it is a file")
    progress = Progress(
        TextColumn("[bold]cells"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), console=errors,
    )
    task = progress.add_task("study", total=len(cells), status="")
    failures = []

    def on_outcome(outcome: Any) -> None:
        if outcome.status == "failed":
            failures.append(outcome)
            progress.console.print(f"cell {outcome.cell.id} failed: {outcome.error}", highlight=False, markup=False)
        progress.update(task, advance=1, status=f"{outcome.cell.id[:60]} {outcome.status}")

    errors.print(f"study {spec.name}: {len(cells)} cells in {folder}", highlight=False, markup=False)
    with progress:
        run_study(spec, cells, folder, workers=workers, on_outcome=on_outcome)
    rows = write_report(cells, folder, spec.name)
    console.print(study_table(folder))
    console.print(f"{len(rows)} of {len(cells)} cells finished; wrote in {folder}: {report_files(folder)}",
                  highlight=False, markup=False)
    if failures:
        print_error(f"{len(failures)} cell(s) failed (see their error.json); re-run the same command to retry them")
        raise typer.Exit(1)
