"""How results are shown: the seed paper's table, a simulation's summary, a study's table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from privfer import EMOTIONS
from privfer.cli.common import console


def report_table(report: dict[str, Any], title: str) -> Table:
    """The seed paper's table: per-class precision / recall / F1, then micro and macro means."""
    table = Table(title=title, title_justify="left")
    table.add_column("class")
    for name in ("precision", "recall", "F1"):
        table.add_column(name, justify="right")
    table.add_column("support", justify="right")
    for name in EMOTIONS:
        row = report["per_class"][name]
        table.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    table.add_section()
    for average in ("micro", "macro"):
        row = report[average]
        table.add_row(
            f"{average} avg", f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
            str(report["support"]),
        )
    return table


def describe_privacy(federation: Any) -> list[str]:
    """What the run promises, printed before it starts."""
    cfg = federation.config
    lines = federation.mechanism.describe(federation.delta)
    if cfg.aggregation.backend == "plain":
        lines.append("aggregator: plain sum -- NOT PRIVATE: the server sees every update (a baseline)")
    return lines


def print_simulation(result: Any, run_dir: Path) -> None:
    """A :class:`privfer.fl.results.SimulationResult` as two tables."""
    title = (
        f"{result.strategy} VFER, aggregator {result.aggregator}: test actors' evaluation halves"
        + (" after federated adaptation" if result.test_after_adaptation else "")
    )
    console.print(report_table(result.test, title))
    summary = Table(title="run", show_header=False, title_justify="left")
    summary.add_column("what")
    summary.add_column("value", justify="right")
    privacy = result.privacy
    if result.private:
        from privfer.privacy.mechanisms import MECHANISMS

        known = MECHANISMS.get(privacy.mechanism)
        summary.add_row("mechanism", known.title if known is not None else str(privacy.mechanism))
        who = "per person" if privacy.unit == "person" else "per client, record level"
        summary.add_row(f"epsilon target ({who}, whole run)", f"{privacy.target_epsilon:g}")
        summary.add_row("epsilon spent: max / median over clients",
                        f"{privacy.epsilon_max:.3f} / {privacy.epsilon_median:.3f}")
        summary.add_row("delta", f"{privacy.delta:.3g}")
    else:
        summary.add_row("epsilon", "inf (no DP)")
    if result.test_after_adaptation:
        summary.add_row("macro F1 before adaptation", f"{result.test_after_training['macro']['f1']:.3f}")
    rounds = result.rounds
    summary.add_row("rounds (training + adaptation)", f"{rounds.training} + {rounds.adaptation}"
                    + (f" ({rounds.aborted} aborted)" if rounds.aborted else ""))
    if result.selected_round is not None:
        summary.add_row("model kept (no DP)", f"training round {result.selected_round}: best validation macro F1")
    if result.pseudo_labels:
        pseudo = result.pseudo_labels
        summary.add_row("pseudo labels kept / correct", f"{pseudo['kept_fraction']:.1%} / {pseudo['accuracy_of_kept']:.1%}")
    summary.add_row("aggregation seconds / MB per client",
                    f"{result.secure_aggregation.seconds:.1f} / "
                    f"{result.secure_aggregation.bytes_per_client_mean / 1e6:.2f}")
    summary.add_row("time", f"{result.seconds:.1f} s")
    console.print(summary)
    console.print(f"wrote {run_dir}/result.json and privacy_ledger.json", highlight=False, markup=False)


def study_table(folder: Path) -> Any:
    from rich.markdown import Markdown

    return Markdown((folder / "study.md").read_text(encoding="utf-8"))
