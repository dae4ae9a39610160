"""``privfer data summary | export | extract``: inspect, export and make clip data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from privfer.cli.common import (ConfigOption, DataOption, SetOption, console, data_app, errors, print_error,
                                resolve_config, user_errors)


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
