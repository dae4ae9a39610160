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

Each cell runs in a process of its own (spawned, so no torch state is
shared), at most ``workers`` at a time; each sets its torch threads to
``cores // workers`` so two workers on two cores do not oversubscribe (which
slows OpenMP by tens of times here). A process per cell, not a process pool:
a cell and the study share one pipe that carries its report, not a pool's
queues with their feeder and manager threads (CPython 3.11's
``ProcessPoolExecutor`` has known hangs there); a process that dies (killed,
out of memory) fails its own cell only, where a broken pool fails every cell
still queued; and one stuck in its exit after its report is killed.
"""

from __future__ import annotations

import os
import traceback
from contextlib import closing
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable

import yaml

from privfer.runs import atomic_write_json, atomic_write_text, training_mismatch, with_added_settings
from privfer.study.spec import Cell, StudySpec

RESULT, ERROR = "result.json", "error.json"
EXIT_SECONDS = 60  # how long a cell's process may take to exit after its report


def finished_result(cell: Cell, directory: Path) -> Path | None:
    """The cell's ``result.json`` if it finished under the config this privfer resolves for it, else None."""
    folder = directory / "cells" / cell.id
    if not (folder / RESULT).is_file():
        return None
    try:
        ran = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if with_added_settings(ran, cell.config) != cell.config.to_dict() or training_mismatch(folder, cell.config):
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


@dataclass
class _Ended:
    """What a cell's process reported: "done" with its seconds, or "failed" with the error and its traceback."""

    status: str
    seconds: float = 0.0
    error: str | None = None
    traceback: str = ""


def _cell_process(cell: Cell, folder: str, threads: int, connection, parent: int) -> None:
    """A cell's process: run it, send how it ended to the parent. It dies with the study's process (Linux), so a
    killed study leaves no cell running into a folder its next run resumes."""
    from privfer.secagg.hosts import die_with_parent

    die_with_parent(parent)
    try:
        ended = _Ended("done", seconds=_run_cell(cell, folder, threads))
    except BaseException as exc:  # reported as the cell's failure; the study goes on
        ended = _Ended("failed", error=f"{exc.__class__.__name__}: {exc}",
                       traceback="".join(traceback.format_exception(exc)))
    try:
        connection.send(ended)
    finally:
        connection.close()


def _run_cells(pending: list[Cell], directory: Path, workers: int, threads: int, target=_cell_process):
    """Run ``pending`` cells, each in a spawned process of its own, at most ``workers`` at once; yields each
    (cell, :class:`_Ended`) as it ends. A process that ends without a report (killed, out of memory) fails its
    cell. Leaving early (an exception, Ctrl-C) terminates the cells still running: their checkpoints resume."""
    context = get_context("spawn")
    queue = list(pending)
    running: dict = {}  # the parent's end of a cell's pipe -> (its process, the cell)
    try:
        while queue or running:
            while queue and len(running) < workers:
                cell = queue.pop(0)
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=target, name=f"privfer-cell-{cell.id}",
                                          args=(cell, str(directory / "cells" / cell.id), threads, sender, os.getpid()))
                process.start()
                sender.close()  # the child holds the only sending end: its death is an EOF here
                running[receiver] = (process, cell)
            for receiver in wait(list(running)):
                process, cell = running[receiver]
                try:
                    ended = receiver.recv()
                except (EOFError, OSError):  # no report, or one cut short: the process died
                    ended = None
                except Exception as exc:  # a report that does not unpickle: the cell failed, the study goes on
                    ended = _Ended("failed", error=f"the cell's report could not be read: {exc.__class__.__name__}")
                _reap(process)  # its report is in: a process stuck in its exit is killed
                del running[receiver]
                receiver.close()
                if not isinstance(ended, _Ended):
                    ended = _Ended("failed", error=f"WorkerDied: the cell's process ended without a result (exit "
                                                   f"code {process.exitcode}: killed, or out of memory)")
                yield cell, ended
    finally:
        for process, _ in running.values():
            process.terminate()
        for receiver, (process, _) in running.items():
            _reap(process)
            receiver.close()


def _reap(process) -> None:
    """Wait for ``process`` to end, at most :data:`EXIT_SECONDS`, then kill it."""
    process.join(timeout=EXIT_SECONDS)
    if process.is_alive():
        process.kill()
        process.join()


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
        with closing(_run_cells(pending, directory, count, threads)) as ending:  # closed: no cell left running
            for cell, outcome in ending:
                folder = directory / "cells" / cell.id
                if outcome.status == "done":
                    (folder / ERROR).unlink(missing_ok=True)
                else:
                    folder.mkdir(parents=True, exist_ok=True)
                    atomic_write_json(folder / ERROR, {"error": outcome.error, "traceback": outcome.traceback})
                outcomes[cell.id] = CellOutcome(cell, outcome.status, outcome.seconds, outcome.error)
                if on_outcome is not None:
                    on_outcome(outcomes[cell.id])
    return [outcomes[cell.id] for cell in cells]


def spec_yaml(spec: StudySpec) -> str:
    import yaml

    data = spec.model_dump(mode="json")
    if not data["exclude"]:  # a spec without exclusions is written as before they existed, so its studies resume
        del data["exclude"]
    return yaml.safe_dump(data, sort_keys=False)


__all__ = ["CellOutcome", "run_study", "worker_count"]
