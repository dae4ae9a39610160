"""Studies: grid expansion and validation, resume without loss or duplicates, failures isolated, reports."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from privfer.cli import app
from privfer.errors import ConfigError
from privfer.study import load_spec, run_study, write_report
from tests.conftest import SMALL

runner = CliRunner()
BASE = {item.split("=")[0]: yaml.safe_load(item.split("=", 1)[1]) for item in SMALL if "epochs" not in item}
BASE.update({"federation.rounds": 1, "federation.clients_per_round": 2, "federation.adaptation": False,
             "aggregation.backend": "plain", "privacy.accountant": "rdp", "output.save_model": False})


def write_spec(tmp_path, grid, seeds=(0,), **extra):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": BASE, "grid": grid, "seeds": list(seeds), **extra}))
    return path


def test_the_grid_expands_to_every_combination_with_validated_configs(tmp_path):
    spec, cells = load_spec(write_spec(tmp_path, {"privacy.epsilon": [1, "inf"],
                                                  "federation.strategy": ["fedavg", "fedper"]}, seeds=(0, 1)))
    assert len(cells) == 2 * 2 * 2 and len({c.id for c in cells}) == 8
    first = cells[0]
    assert first.config.privacy.epsilon == 1 and first.config.federation.strategy == "fedavg" and first.seed == 0
    assert cells[-1].config.privacy.epsilon == math.inf and cells[-1].config.federation.strategy == "fedper"
    assert all(c.config.federation.rounds == 1 for c in cells)


@pytest.mark.parametrize(
    ("grid", "extra", "message"),
    [
        ({"privacy.epsilonn": [1]}, {}, "privacy.epsilonn: unknown setting"),
        ({"privacy.epsilon": [-1]}, {}, "privacy.epsilon = -1"),
        ({"privacy.epsilon": []}, {}, "grid field privacy.epsilon has no values"),
        ({"seed": [1, 2]}, {}, "use 'seeds'"),
        ({"privacy.epsilon": [1]}, {"colour": "red"}, "colour: unknown setting"),
        ({"privacy.epsilon": [1]}, {"exclude": [{"privacy.unit": "person"}]}, "privacy.unit is not a grid field"),
        ({"privacy.epsilon": [1]}, {"exclude": [{"privacy.epsilon": 3}]}, "3 is not one of privacy.epsilon's"),
        ({"privacy.epsilon": [1]}, {"exclude": [{}]}, "exclude entry 0 is empty"),
        ({"privacy.epsilon": [1]}, {"exclude": [{"privacy.epsilon": 1.0}]}, "leave no cell of the grid"),
    ],
)
def test_bad_specs_are_clear_errors_before_anything_runs(tmp_path, grid, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_spec(write_spec(tmp_path, grid, **extra))


def test_excluded_combinations_are_left_out_and_the_rest_kept(tmp_path):
    grid = {"privacy.epsilon": [3, "inf"], "federation.strategy": ["fedavg", "amy"],
            "privacy.unit": ["record", "person"]}
    exclude = [{"federation.strategy": "amy", "privacy.unit": "record", "privacy.epsilon": 3},
               {"privacy.unit": "person", "privacy.epsilon": float("inf")}]  # .inf in YAML matches the grid's "inf"
    base = {k: v for k, v in BASE.items() if k not in ("aggregation.backend", "privacy.accountant")}
    _, cells = load_spec(write_spec(tmp_path, grid, seeds=(0, 1), exclude=exclude, base=base))
    kept = {(c.values["privacy.epsilon"], c.values["federation.strategy"], c.values["privacy.unit"]) for c in cells}
    assert kept == {(3, "fedavg", "record"), (3, "fedavg", "person"), (3, "amy", "person"),
                    ("inf", "fedavg", "record"), ("inf", "amy", "record")}
    assert len(cells) == 2 * len(kept)


def test_a_spec_without_exclusions_is_written_as_before_so_old_studies_resume(tmp_path):
    from privfer.study.runner import spec_yaml

    spec, _ = load_spec(write_spec(tmp_path, {"privacy.epsilon": [1, "inf"]}))
    assert "exclude" not in spec_yaml(spec)  # the text a study folder written before exclusions holds
    spec, _ = load_spec(write_spec(tmp_path, {"privacy.epsilon": [1, "inf"]}, exclude=[{"privacy.epsilon": 1}]))
    assert "exclude" in spec_yaml(spec)


def finished(folder):
    return sorted(p.parent.name for p in (folder / "cells").glob("*/result.json"))


@pytest.mark.slow
def test_a_killed_study_resumes_without_losing_or_repeating_cells(tmp_path):
    spec, cells = load_spec(write_spec(tmp_path, {"privacy.epsilon": [2, "inf"]}, seeds=(0, 1)))
    folder = tmp_path / "study"
    run_study(spec, cells[:2], folder, workers=1)  # "killed" after two cells
    before = {cid: (folder / "cells" / cid / "result.json").stat().st_mtime_ns for cid in finished(folder)}
    outcomes = run_study(spec, cells, folder, workers=2)
    assert [o.status for o in outcomes] == ["skipped", "skipped", "done", "done"]
    assert finished(folder) == sorted(c.id for c in cells)
    for cid, stamp in before.items():  # finished cells were not run again
        assert (folder / "cells" / cid / "result.json").stat().st_mtime_ns == stamp
    rows = write_report(cells, folder, spec.name)
    assert len(rows) == 4 and len({r["cell"] for r in rows}) == 4


def test_a_cell_finished_under_another_config_is_neither_skipped_nor_reported(tmp_path):
    # A cell id names only its grid values and seed: when a default changes between privfer versions (issue 26:
    # runs without DP), the old result is another run, and the study says so instead of reporting it as this one.
    spec, cells = load_spec(write_spec(tmp_path, {"privacy.epsilon": ["inf"]}))
    folder = tmp_path / "study"
    run_study(spec, cells, folder, workers=1)
    saved = folder / "cells" / cells[0].id / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    old["model"]["readout"] = "last" if old["model"]["readout"] == "mean" else "mean"
    saved.write_text(yaml.safe_dump(old, sort_keys=False))
    outcome = run_study(spec, cells, folder, workers=1)[0]
    assert outcome.status == "failed" and "model.readout" in outcome.error and "different config" in outcome.error
    assert write_report(cells, folder, spec.name) == []


@pytest.mark.slow
def test_a_failing_cell_is_isolated_and_reported(tmp_path):
    spec, cells = load_spec(write_spec(tmp_path, {"federation.clients_per_round": [2, 500]}))
    outcomes = run_study(spec, cells, tmp_path / "study", workers=2)
    statuses = {o.cell.values["federation.clients_per_round"]: o for o in outcomes}
    assert statuses[2].status == "done"
    assert statuses[500].status == "failed" and "clients_per_round = 500" in statuses[500].error
    error = json.loads((tmp_path / "study" / "cells" / statuses[500].cell.id / "error.json").read_text())
    assert "clients_per_round" in error["error"]
    again = run_study(spec, cells, tmp_path / "study", workers=1)  # a re-run retries the failed cell only
    assert [o.status for o in again] == ["skipped", "failed"] and "clients_per_round = 500" in again[1].error


def _report_or_die(cell, folder, threads, connection, parent):
    """A stand-in for a cell's process (spawned: module level): the seed-1 cell dies without a word, as one the OOM
    killer ends; the others report at once, and the seed-2 one then never exits (a thread that does not end)."""
    import os
    import threading
    import time

    from privfer.study.runner import _Ended

    if cell.seed == 1:
        os._exit(9)
    connection.send(_Ended("done", seconds=float(cell.seed)))
    connection.close()
    if cell.seed == 2:
        threading.Thread(target=time.sleep, args=(600,)).start()


def test_a_cell_whose_process_dies_fails_alone_and_no_process_outlives_the_study(tmp_path, monkeypatch):
    import multiprocessing

    from privfer.study import runner
    from privfer.study.runner import _run_cells

    monkeypatch.setattr(runner, "EXIT_SECONDS", 1)  # the seed-2 cell's process, stuck after its report, is killed

    spec, cells = load_spec(write_spec(tmp_path, {"privacy.epsilon": ["inf"]}, seeds=(0, 1, 2)))
    ended = dict((cell.seed, outcome) for cell, outcome in _run_cells(cells, tmp_path, 2, 1, target=_report_or_die))
    assert ended[0].status == ended[2].status == "done" and ended[2].seconds == 2.0
    assert ended[1].status == "failed" and "without a result (exit code 9" in ended[1].error
    assert multiprocessing.active_children() == []
    running = _run_cells(cells, tmp_path, 2, 1, target=_report_or_die)
    next(running)  # the study leaves (Ctrl-C, say) with cells still running: they are stopped and reaped
    running.close()
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_the_command_runs_reports_and_regenerates(tmp_path):
    spec = write_spec(tmp_path, {"privacy.epsilon": [3, "inf"], "federation.strategy": ["fedavg", "fedper"]})
    folder = tmp_path / "study"
    result = runner.invoke(app, ["study", str(spec), "--out", str(folder), "--workers", "2"])
    assert result.exit_code == 0, result.output
    for name in ("study.csv", "study.md", "privacy_utility.png", "per_class_f1.png", "spec.yaml"):
        assert (folder / name).is_file()
    with open(folder / "study.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["privacy.epsilon"] for r in rows} == {"3.0", "inf"}
    assert all(0 <= float(r["macro_f1"]) <= 1 and "f1_anger" in r for r in rows)
    table = (folder / "study.md").read_text()
    assert "| epsilon | fedavg | fedper |" in table and "| inf |" in table
    (folder / "study.md").unlink()
    (folder / "privacy_utility.png").unlink()
    again = runner.invoke(app, ["study", "report", str(folder)])
    assert again.exit_code == 0 and (folder / "study.md").read_text() == table
    assert (folder / "privacy_utility.png").read_bytes()[:4] == b"\x89PNG"
    other = write_spec(tmp_path, {"privacy.epsilon": [5]})
    refused = runner.invoke(app, ["study", str(other), "--out", str(folder)])
    assert refused.exit_code == 2 and "another spec" in refused.stderr


def test_a_population_study_gets_a_table_and_a_plot_by_population(tmp_path):
    from privfer.study.report import plot_population, population_table

    rows = []
    for population, person, record in ((100, 0.17, 0.38), (300, 0.26, 0.46), (1000, 0.40, 0.47)):
        for unit, score in (("person", person), ("record", record)):
            rows.append({"privacy.epsilon": 3.0, "federation.strategy": "fedavg", "personal_layers": 0,
                         "mechanism": "distributed", "unit": unit, "population": population, "macro_f1": score})
    table = population_table(rows)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert "fedavg, person level, eps 3" in lines[0] and "fedavg, record level, eps 3" in lines[0]
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| 100", "| 300", "| 1000"]
    assert "0.400 ± 0.000" in lines[-1] and "0.470 ± 0.000" in lines[-1]
    plot_population(rows, tmp_path / "population.png", "population")
    assert (tmp_path / "population.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_seeds_are_pooled_any_other_varying_setting_names_its_line():
    from privfer.study.report import markdown_table

    rows = []
    for participation, scores in ((1.0, (0.40, 0.42)), (0.2, (0.30, 0.34))):
        for seed, score in enumerate(scores):
            rows.append({"privacy.epsilon": 3.0, "federation.strategy": "fedavg", "personal_layers": 0,
                         "mechanism": "distributed", "unit": "person", "population": 1000, "macro_f1": score,
                         "privacy.participation": participation, "seed": seed, "epsilon_max": 2.99,
                         "axes": ("privacy.participation", "privacy.epsilon")})
    table = markdown_table(rows, "participation")
    assert "fedavg, participation 1.0" in table and "fedavg, participation 0.2" in table
    assert "0.410 ± 0.014 (2)" in table and "0.320 ± 0.028 (2)" in table  # two seeds each, never four cells
