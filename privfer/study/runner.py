"""Run a study's cells in parallel worker processes; resumable, failures isolated.

Each cell is a ``privfer simulate`` run in ``STUDY/cells/<cell id>/`` (its own
checkpoints, so a cell killed half-way resumes from its last round). A cell
is finished when its ``result.json`` exists and its ``config.yaml`` is the
config this privfer resolves for the cell (a cell id names only the grid
values and seed: a default that changed since makes another run, which is
refused with the differing settings, never reported as this one);
re-running the study skips finished cells and runs the rest, so a killed study loses at most the rounds
in flight and never duplicates a cell. A cell that raises writes
``error.json`` (atomically) and the others go on; the next run retries it.

Workers are separate processes (spawned, so no torch state is shared), and
each sets its torch threads to ``cores // workers`` so two workers on two
cores do not oversubscribe (which slows OpenMP by tens of times here).
"""

from __future__ import annotations

import os
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import yaml

from privfer.runs import atomic_write_json, atomic_write_text, training_mismatch
from privfer.study.spec import Cell, StudySpec

RESULT, ERROR = "result.json", "error.json"


def finished_result(cell: Cell, directory: Path) -> Path | None:
    """The cell's ``result.json`` if it finished under the config this privfer resolves for it, else None."""
    folder = directory / "cells" / cell.id
    if not (folder / RESULT).is_file():
        return None
    try:
        ran = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if ran != cell.config.to_dict() or training_mismatch(folder, cell.config) is not None:
        return None  # run again into its folder, which refuses it with the reason (privfer.runs)
    return folder / RESULT


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # "done", "skipped" (finished before), "failed"
    seconds: float = 0.0
    error: str | None = None


def worker_count(spec: StudySpec, cells: int, cores: int | None = None) -> int:
    cores = cores or os.cpu_count() or 1
    wanted = cores if spec.workers == "auto" else int(spec.workers)
    return max(1, min(wanted, cells))


def _run_cell(cell: Cell, folder: str, threads: int) -> float:
    """In a worker process: one simulate run into ``folder``; returns its seconds."""
    import warnings

    import torch

    from privfer.fl.allocator import keep_freed_memory
    from privfer.fl.simulation import simulate

    keep_freed_memory()  # the worker is a process of its own (spawned): see privfer.fl.allocator
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=UserWarning)  # clipping reports etc. land in the cell's result
    result = simulate(cell.config, Path(folder))  # the threads stay out of the config: resumes on any machine
    return float(result.seconds)


def run_study(
    spec: StudySpec,
    cells: list[Cell],
    directory: Path,
    *,
    workers: int | None = None,
    on_outcome: Callable[[CellOutcome], None] | None = None,
) -> list[CellOutcome]:
    """Run every unfinished cell; returns each cell's outcome in the cells' order."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cells").mkdir(exist_ok=True)
    atomic_write_text(directory / "spec.yaml", spec_yaml(spec))
    outcomes: dict[str, CellOutcome] = {}
    pending = []
    for cell in cells:
        if finished_result(cell, directory) is not None:
            outcomes[cell.id] = CellOutcome(cell, "skipped")
            if on_outcome is not None:
                on_outcome(outcomes[cell.id])
        else:
            folder = directory / "cells" / cell.id
            (folder / ERROR).unlink(missing_ok=True)  # a retry: the old failure is superseded
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()  # it failed before the run directory was made
            pending.append(cell)
    count = workers or worker_count(spec, len(pending))
    threads = max(1, (os.cpu_count() or 1) // max(count, 1))
    if pending:
        with ProcessPoolExecutor(max_workers=count, mp_context=get_context("spawn")) as pool:
            running = {
                pool.submit(_run_cell, cell, str(directory / "cells" / cell.id), threads): cell for cell in pending
            }
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    cell = running.pop(future)
                    folder = directory / "cells" / cell.id
                    try:
                        outcome = CellOutcome(cell, "done", seconds=future.result())
                        (folder / ERROR).unlink(missing_ok=True)
                    except Exception as exc:  # a failed cell is reported, the others go on
                        text = f"{exc.__class__.__name__}: {exc}"
                        folder.mkdir(parents=True, exist_ok=True)
                        atomic_write_json(folder / ERROR, {
                            "error": text,
                            "traceback": "".join(traceback.format_exception(exc)),
                        })
                        outcome = CellOutcome(cell, "failed", error=text)
                    outcomes[cell.id] = outcome
                    if on_outcome is not None:
                        on_outcome(outcome)
    return [outcomes[cell.id] for cell in cells]


def spec_yaml(spec: StudySpec) -> str:
    import yaml

    data = spec.model_dump(mode="json")
    if not data["exclude"]:  # a spec without exclusions is written as before they existed, so its studies resume
        del data["exclude"]
    return yaml.safe_dump(data, sort_keys=False)


__all__ = ["CellOutcome", "run_study", "worker_count"]
