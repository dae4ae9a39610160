"""The ``privfer`` command line: thin typed functions over the library.

Each command parses its options into a config, calls one library function and
prints the result. A user error (bad option, config, data or run directory)
prints one line on stderr and exits with code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import sys
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from privfer import EMOTIONS, __version__
from privfer.config import PrivferConfig, load_config
from privfer.errors import PrivferError
from privfer.runs import create_unique_dir

app = typer.Typer(
    name="privfer",
    help="Private federated learning for video facial expression recognition.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect and export the clip data.", no_args_is_help=True)
config_app = typer.Typer(help="Show the resolved configuration and every setting.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

console = Console()
errors = Console(stderr=True)

ConfigOption = typer.Option(None, "--config", "-c", help="YAML config file (defaults: configs/default.yaml's values).")
SetOption = typer.Option(
    None, "--set", "-s", help="Override a setting, e.g. --set training.epochs=5 (repeatable)."
)
DataOption = typer.Option(None, "--data", help="CREMA-D folder with features/ (default: built-in synthetic data).")
OutOption = typer.Option(None, "--out", "-o", help="Run directory (re-run to resume).")
JsonOption = typer.Option(False, "--json", help="Print the result as JSON instead of tables.")


def print_error(message: str) -> None:
    """One line on stderr; the message is text, never Rich markup (paths may hold brackets)."""
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`PrivferError` into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PrivferError as exc:
            print_error(str(exc))
            raise typer.Exit(2) from None

    return wrapper


def resolve_config(
    config: Optional[Path], overrides: Optional[List[str]], data: Optional[Path] = None, **settings: Any
) -> PrivferConfig:
    """Config file, then --data, then command options, then --set overrides (last wins)."""
    extra: list[str] = []
    if data is not None:
        extra += ["data.source=cremad", f"data.root={json.dumps(str(data))}"]
    extra += [f"{key}={json.dumps(value)}" for key, value in settings.items() if value is not None]
    return load_config(config, [*extra, *(overrides or [])])


def version_callback(value: bool) -> None:
    if value:
        console.print(f"privfer {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Print the version."),
) -> None:
    """privfer: DP-SGD clients, secure aggregation and privacy audits for video FER."""


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


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextlib.contextmanager
def run_directory(out: Optional[Path], cfg: PrivferConfig, stem: str) -> Iterator[Path]:
    """``out``, or a new ``{output.dir}/{stem}-{time}``; folders made here are removed again on a user error."""
    made = [] if out is not None or cfg.output.dir.exists() else [cfg.output.dir]
    run_dir = out if out is not None else create_unique_dir(cfg.output.dir, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out is None:
        made.insert(0, run_dir)
    try:
        yield run_dir
    except PrivferError:
        for folder in made:  # folders made for this run that still hold nothing
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


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


@app.command()
@user_errors
def simulate(
    epsilon: Optional[float] = typer.Option(
        None, "--epsilon", "-e", help="TOTAL per-client budget for the whole run (record level); inf: no DP."
    ),
    delta: Optional[float] = typer.Option(None, "--delta", help="Delta (default 1 / (10 x records per client))."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="fedavg, fedper, fedprox (options: --set federation.strategy_options.mu=0.01)."),
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
        progress.update(task, total=total, completed=done, phase="training")

    def on_round(record: Any) -> None:
        loss = "-" if record.train_loss is None else f"{record.train_loss:.3f}"
        val = "" if record.val_macro_f1 is None else f"  val macro-F1 {record.val_macro_f1:.3f}"
        note = f"  ABORTED: {record.aborted}" if record.aborted else ""
        progress.update(
            task, advance=1, phase=record.phase,
            status=f"{len(record.included)}/{len(record.clients)} clients  loss {loss}{val}{note}",
        )

    try:
        with run_directory(out, cfg, "simulate") as run_dir:
            result = run_simulation(cfg, run_dir, on_start=on_start, on_round=on_round)
    finally:
        preparing.stop()
        progress.stop()
    if as_json:
        console.print_json(json.dumps(result.to_json()))
        return
    print_simulation(result, run_dir)


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
    if result.pseudo_labels:
        pseudo = result.pseudo_labels
        summary.add_row("pseudo labels kept / correct", f"{pseudo['kept_fraction']:.1%} / {pseudo['accuracy_of_kept']:.1%}")
    summary.add_row("aggregation seconds / MB per client",
                    f"{result.secure_aggregation.seconds:.1f} / "
                    f"{result.secure_aggregation.bytes_per_client_mean / 1e6:.2f}")
    summary.add_row("time", f"{result.seconds:.1f} s")
    console.print(summary)
    console.print(f"wrote {run_dir}/result.json and privacy_ledger.json", highlight=False, markup=False)


class UsageError(PrivferError):
    """A command was called with options that do not fit together."""


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


def study_table(folder: Path) -> Any:
    from rich.markdown import Markdown

    return Markdown((folder / "study.md").read_text(encoding="utf-8"))


@data_app.command("summary")
@user_errors
def data_summary(
    config: Optional[Path] = ConfigOption,
    data: Optional[Path] = DataOption,
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Actors, clips, class balance and annotator agreement of the configured data."""
    from privfer.data import load_clips
    from privfer.data.summary import summarize

    cfg = resolve_config(config, overrides, data)
    summary = summarize(load_clips(cfg.data))
    table = Table(title="data", show_header=False, title_justify="left")
    for key, value in summary.items():
        if key != "classes":
            table.add_row(key, f"{value:.3f}" if isinstance(value, float) else escape(str(value)))
    console.print(table)
    classes = Table(title="classes", title_justify="left")
    for column in ("class", "clips (acted)", "share of votes"):
        classes.add_column(column, justify="right" if column != "class" else "left")
    for name, row in summary["classes"].items():
        classes.add_row(name, str(row["clips"]), f"{row['vote_share']:.3f}")
    console.print(classes)


@data_app.command("export")
@user_errors
def data_export(
    folder: Path = typer.Argument(..., help="Where to write the CREMA-D-layout folder (must not exist)."),
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Write the configured data (synthetic by default) as a CREMA-D folder with features/."""
    from privfer.data import load_clips
    from privfer.data.cremad import export_cremad_layout

    cfg = resolve_config(config, overrides)
    clips = load_clips(cfg.data)
    export_cremad_layout(clips, folder)
    console.print(f"wrote {len(clips)} clips of {len(clips.actors)} actors to {folder}", highlight=False, markup=False)


@data_app.command("extract")
@user_errors
def data_extract(
    videos: Path = typer.Argument(..., help="Folder of videos (searched recursively; CREMA-D's VideoFlash/*.flv)."),
    encoder: Path = typer.Option(..., "--encoder", help="Frozen frame encoder: TorchScript (.pt) or ONNX (.onnx), "
                                 "(B, 3, S, S) RGB crops -> (B, D) features."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write (features/<clip>.npy, "
                             "extraction.json); re-run to resume."),
    frames: int = typer.Option(16, "--frames", help="Frames sampled evenly per clip (T)."),
    face: str = typer.Option("haar", "--face", help="haar: OpenCV's frontal-face cascade; none: a centre crop."),
    size: int = typer.Option(256, "--size", help="Crop side in pixels (the encoder's input size)."),
    margin: float = typer.Option(0.25, "--margin", help="Margin around the detected face, as a share of its side."),
    normalize: str = typer.Option("imagenet", "--normalize", help="Crop normalization the encoder expects: imagenet "
                                  "(mean/std of ImageNet), unit ([0, 1]) or symmetric ([-1, 1])."),
    min_face_fraction: float = typer.Option(0.5, "--min-face-fraction", help="A clip with a face in fewer of its "
                                            "sampled frames is reported and not written."),
    workers: int = typer.Option(1, "--workers", help="Processes decoding videos and finding faces."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="CREMA-D folder whose VideoDemographics.csv "
                                            "and processedResults/ are copied alongside (default: the videos "
                                            "folder's parent, if it has them)."),
) -> None:
    """Turn videos into privfer's features: frames -> face crops -> your frozen encoder -> features/<clip>.npy."""
    from privfer.data.extract import ExtractOptions, extract

    options = ExtractOptions(frames=frames, face=face, size=size, margin=margin, normalize=normalize,  # type: ignore[arg-type]
                             min_face_fraction=min_face_fraction)
    progress = Progress(
        TextColumn("[bold]clips"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=errors,
    )
    task = progress.add_task("extract", total=None, status="", start=False)
    failed = []

    def on_start(total: int, done: int) -> None:
        if done:
            errors.print(f"resuming: {done} of {total} clips already extracted", highlight=False, markup=False)
        progress.update(task, total=total, completed=done)
        progress.start()
        progress.start_task(task)

    def on_clip(report: Any) -> None:
        if report.status != "ok":
            failed.append(report.clip)
        progress.update(task, advance=1, status=f"{len(failed)} failed" if failed else "")

    try:
        manifest = extract(videos, encoder, out, options, workers=workers, metadata=metadata, on_clip=on_clip,
                           on_start=on_start)
    finally:
        progress.stop()
    summary = manifest["summary"]
    if summary["ok"] == 0:
        print_error(f"no clip of {summary['videos']} was extracted; the reasons are in {out / 'extraction.json'}")
        raise typer.Exit(2)
    console.print(f"{summary['ok']} of {summary['videos']} clips extracted ({manifest['feature_dim']} features x "
                  f"{frames} frames) to {out / 'features'}; {summary['failed']} failed (reasons in "
                  f"{out / 'extraction.json'})", highlight=False, markup=False)
    if manifest["metadata_copied"]:
        console.print(f"copied {', '.join(manifest['metadata_copied'])} alongside", highlight=False, markup=False)


@config_app.command("show")
@user_errors
def config_show(
    config: Optional[Path] = ConfigOption,
    data: Optional[Path] = DataOption,
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Print the resolved config as YAML (defaults < file < --data < --set)."""
    console.print(resolve_config(config, overrides, data).to_yaml(), highlight=False, soft_wrap=True, markup=False)


@config_app.command("fields")
@user_errors
def config_fields() -> None:
    """List every setting with its default, allowed values and meaning."""
    from privfer.config import describe_fields

    table = Table(title="settings (use with --set field=value)", title_justify="left")
    for column in ("field", "default", "allowed", "description"):
        table.add_column(column)
    for row in describe_fields():
        table.add_row(row["field"], row["default"], row["allowed"], row["description"])
    console.print(table)


from privfer import cli_audit, cli_identity  # noqa: E402,F401 - register `audit`, `canary-audit`, `identity`, `enroll`


def main() -> None:
    """Console-script entry point: usage errors too are one line and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        print_error("aborted")
        sys.exit(130)
    except Exception as exc:
        # Typer's (vendored) click raises UsageError and its kin here; they carry
        # an exit code and a message. Anything else is a bug and keeps its traceback.
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            console.print(ctx.get_help(), markup=False, highlight=False)
            sys.exit(0)
        command = ctx.command_path if ctx is not None else "privfer"
        print_error(f"{exc.format_message()} (see: {command} --help)")
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
