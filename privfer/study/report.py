"""A study's tables and plots, built from its finished cells (and rebuilt any time from them).

Outputs in the study directory: ``study.csv`` (one row per finished cell:
every grid value, seed, macro / micro F1, per-class F1, epsilon spent,
seconds, secure-aggregation cost), ``study.md`` (macro F1 mean ± std over
seeds, epsilon x strategy), ``privacy_utility.png`` (macro F1 against
epsilon, one line per strategy, error bars, log epsilon axis with "inf" for
no DP) and ``per_class_f1.png`` (a heat map of per-class F1, strategy x
epsilon). A study over several synthetic population sizes also gets a table
by population and ``population.png`` (macro F1 against persons, log axis).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from privfer import EMOTIONS
from privfer.fl.results import SimulationResult
from privfer.runs import atomic_write_bytes, atomic_write_text
from privfer.study.runner import finished_result
from privfer.study.spec import Cell

EPSILON, STRATEGY, POPULATION, AXES = "privacy.epsilon", "federation.strategy", "population", "axes"
# grid settings a line's label (or the table's rows and columns) already tells apart
LABELLED = {EPSILON, STRATEGY, "privacy.mechanism", "privacy.unit", "aggregation.backend", "federation.personal_layers",
            "data.synthetic.actors", "privacy.enabled"}


def _epsilon(value: Any) -> float:
    if value is None:
        return math.inf
    return float(value)


def collect(cells: list[Cell], directory: Path) -> list[dict[str, Any]]:
    """One row per finished cell, in the cells' order (a result run under another config is not this cell's)."""
    rows = []
    for cell in cells:
        path = finished_result(cell, directory)
        if path is None:
            continue
        result = SimulationResult.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
        config = cell.config
        row: dict[str, Any] = {"cell": cell.id, **cell.values, "seed": cell.seed, AXES: tuple(cell.values)}
        row[EPSILON] = _epsilon(config.privacy.epsilon if config.privacy.enabled else None)
        row[STRATEGY] = config.federation.strategy
        row["personal_layers"] = config.federation.personal_layers if config.federation.strategy == "fedper" else 0
        row["aggregator"] = result.aggregator
        row["mechanism"] = config.selected_mechanism  # a no-DP cell still belongs to its mechanism's line
        row["unit"] = config.privacy.unit
        row[POPULATION] = config.data.synthetic.actors if config.data.source == "synthetic" else None
        row["macro_f1"] = result.macro_f1
        row["micro_f1"] = result.test["micro"]["f1"]
        for emotion in EMOTIONS:
            row[f"f1_{emotion}"] = result.test["per_class"][emotion]["f1"]
        row["epsilon_max"] = result.privacy.epsilon_max
        row["epsilon_median"] = result.privacy.epsilon_median
        row["seconds"] = result.seconds
        row["secagg_seconds"] = result.secure_aggregation.seconds
        row["secagg_mb_per_client"] = result.secure_aggregation.bytes_per_client_mean / 1e6
        rows.append(row)
    return rows


def _label(row: dict[str, Any], with_mechanism: bool, with_unit: bool = False) -> str:
    label = row[STRATEGY]
    if row[STRATEGY] == "fedper" and row["personal_layers"] != 1:
        label = f"fedper ({row['personal_layers']} personal)"
    if with_mechanism:
        label = f"{label}, {row.get('mechanism', 'local')}"
    return f"{label}, {row.get('unit', 'record')} level" if with_unit else label


def _groups(rows: list[dict[str, Any]], by_population: bool = False) -> dict[tuple, list[dict[str, Any]]]:
    """Rows by (line label, epsilon) — or (label, epsilon, population) — the label naming the mechanism and the
    unit when the study has more than one."""
    several = len({row.get("mechanism", "local") for row in rows}) > 1
    units = len({row.get("unit", "record") for row in rows}) > 1
    populations = not by_population and len(_populations(rows)) > 1  # never pool cells of different populations
    # any other grid setting that varies names its own lines: only seeds are pooled into a mean ± std
    others = sorted({key for row in rows for key in row.get(AXES, ()) if key not in LABELLED
                     and len({json.dumps(r.get(key), default=str) for r in rows}) > 1})
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        label = _label(row, several, units) + (f", {row.get(POPULATION)} persons" if populations else "")
        label += "".join(f", {key.split('.')[-1]} {row.get(key)}" for key in others)
        key = (label, row[EPSILON])
        groups[key + ((row.get(POPULATION),) if by_population else ())].append(row)
    return groups


def _populations(rows: list[dict[str, Any]]) -> list[int]:
    return sorted({row[POPULATION] for row in rows if row.get(POPULATION) is not None})


def population_table(rows: list[dict[str, Any]]) -> str:
    """Macro F1 mean ± std over seeds by population (rows) and line x epsilon (columns)."""
    groups = _groups(rows, by_population=True)
    lines_ = sorted({(label, eps) for label, eps, _ in groups})
    out = ["", "## By population", "",
           "Macro F1 by the number of persons in the synthetic population (mean ± std over seeds).", "",
           "| persons | " + " | ".join(f"{label}, eps {_eps_text(eps)}" for label, eps in lines_) + " |",
           "|---|" + "---|" * len(lines_)]
    for population in _populations(rows):
        cells = []
        for label, eps in lines_:
            scores = [r["macro_f1"] for r in groups.get((label, eps, population), [])]
            spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
            cells.append(f"{statistics.mean(scores):.3f} ± {spread:.3f}" if scores else "-")
        out.append(f"| {population} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot_population(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Macro F1 against the population (log axis), one line per (strategy, mechanism, unit, epsilon)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows, by_population=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, eps in sorted({(label, eps) for label, eps, _ in groups}):
        points = sorted((pop, [r["macro_f1"] for r in rs]) for (lab, e, pop), rs in groups.items()
                        if lab == label and e == eps)
        ax.errorbar([p for p, _ in points], [statistics.mean(s) for _, s in points],
                    yerr=[statistics.stdev(s) if len(s) > 1 else 0.0 for _, s in points], marker="o", capsize=4,
                    label=f"{label}, eps {_eps_text(eps)}")
    ax.set_xscale("log")
    ax.axhline(1 / len(EMOTIONS), color="grey", linestyle=":", linewidth=1, label="1/6 (chance accuracy)")
    ax.set_xlabel("persons in the population (clients)")
    ax.set_ylabel("macro F1 (test actors)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def _eps_text(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns and k != AXES)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()
                         if k != AXES})
    atomic_write_text(path, buffer.getvalue())


def markdown_table(rows: list[dict[str, Any]], title: str) -> str:
    """Macro F1 mean ± std over seeds: one row per epsilon, one column per strategy."""
    groups = _groups(rows)
    size = {label: members[0].get(POPULATION) or 0 for (label, _), members in groups.items()}
    labels = sorted(size, key=lambda label: (label.split(",")[0], size[label], label))  # populations in order
    epsilons = sorted({eps for _, eps in groups})
    lines = [f"# {title}", "", "Macro F1 on the test actors' evaluation halves, mean ± std over seeds (n).", ""]
    lines.append("| epsilon | " + " | ".join(labels) + " |")
    lines.append("|---|" + "---|" * len(labels))
    for eps in epsilons:
        cells = []
        for label in labels:
            scores = [r["macro_f1"] for r in groups.get((label, eps), [])]
            if not scores:
                cells.append("-")
                continue
            spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
            cells.append(f"{statistics.mean(scores):.3f} ± {spread:.3f} ({len(scores)})")
        lines.append(f"| {_eps_text(eps)} | " + " | ".join(cells) + " |")
    spent = [r["epsilon_max"] for r in rows if r["epsilon_max"] is not None]
    if spent:
        lines += ["", f"Largest epsilon any client spent in any cell: {max(spent):.3f}."]
    return "\n".join(lines) + "\n"


def plot_privacy_utility(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    finite = sorted({eps for _, eps in groups if not math.isinf(eps)})
    inf_x = (finite[-1] * 4) if finite else 1.0
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label in sorted({label for label, _ in groups}):
        points = sorted((eps, [r["macro_f1"] for r in rs]) for (lab, eps), rs in groups.items() if lab == label)
        xs = [inf_x if math.isinf(eps) else eps for eps, _ in points]
        means = [statistics.mean(s) for _, s in points]
        errors = [statistics.stdev(s) if len(s) > 1 else 0.0 for _, s in points]
        ax.errorbar(xs, means, yerr=errors, marker="o", capsize=4, label=label)
    ax.set_xscale("log")
    ticks = finite + [inf_x]
    ax.set_xticks(ticks)
    ax.set_xticklabels([_eps_text(t) for t in finite] + ["inf\n(no DP)"])
    ax.minorticks_off()
    ax.axhline(1 / len(EMOTIONS), color="grey", linestyle=":", linewidth=1, label="1/6 (chance accuracy)")
    ax.set_xlabel("epsilon per client, whole run (record level)")
    ax.set_ylabel("macro F1 (test actors)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    """PNG written atomically (a killed report never leaves half an image)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_per_class(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = _groups(rows)
    keys = sorted(groups, key=lambda k: (k[0], k[1]))
    matrix = np.array([[statistics.mean(r[f"f1_{e}"] for r in groups[k]) for e in EMOTIONS] for k in keys])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(keys) + 1.8))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(EMOTIONS)))
    ax.set_xticklabels(EMOTIONS, rotation=30)
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([f"{label}, eps {_eps_text(eps)}" for label, eps in keys])
    for i in range(len(keys)):
        for j in range(len(EMOTIONS)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center",
                    color="white" if matrix[i, j] < 0.5 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, label="F1 (mean over seeds)")
    ax.set_title(title)
    _save(fig, path)


REPORT_FILES = ("study.csv", "study.md", "privacy_utility.png", "per_class_f1.png", "population.png")


def report_files(directory: Path) -> str:
    """The report files present in ``directory``, for a one-line summary."""
    return ", ".join(name for name in REPORT_FILES if (Path(directory) / name).exists())


def write_report(cells: list[Cell], directory: Path, name: str) -> list[dict[str, Any]]:
    """study.csv, study.md and both plots from the finished cells; returns the rows."""
    rows = collect(cells, directory)
    write_csv(rows, directory / "study.csv")
    several_populations = len(_populations(rows)) > 1
    table = markdown_table(rows, f"Study {name}") + (population_table(rows) if several_populations else "")
    atomic_write_text(directory / "study.md", table)
    if rows:
        plot_privacy_utility(rows, directory / "privacy_utility.png", f"{name}: privacy vs utility")
        plot_per_class(rows, directory / "per_class_f1.png", f"{name}: per-class F1")
        if several_populations:
            plot_population(rows, directory / "population.png", f"{name}: utility vs population")
    return rows


__all__ = ["REPORT_FILES", "collect", "markdown_table", "plot_population", "population_table", "report_files",
           "write_report"]
