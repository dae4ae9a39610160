"""The run: every video under a folder -> features files and a manifest, atomically, resumably, in parallel."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from privfer.data.extract import decode
from privfer.data.extract.common import (MANIFEST, MANIFEST_VERSION, VIDEO_SUFFIXES, ClipReport, EncoderError,
                                         ExtractionError, ExtractOptions)
from privfer.data.extract.encoder import Encoder
from privfer.data.extract.faces import FaceFinder, clip_crops
from privfer.runs import atomic_write_text


def find_videos(folder: Path) -> list[Path]:
    """Every video file under ``folder`` (recursively), sorted; clip names (file stems) must be unique."""
    if not folder.is_dir():
        raise ExtractionError(f"{folder} is not a folder of videos")
    videos = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise ExtractionError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) under {folder}")
    seen: dict[str, Path] = {}
    for video in videos:
        if video.stem in seen:
            raise ExtractionError(f"two videos would write the same clip {video.stem!r}: {seen[video.stem]} and {video}")
        seen[video.stem] = video
    return videos


def _atomic_save(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _complete(path: Path, frames: int, dim: int | None) -> bool:
    """A features file a previous run finished: float32, (frames, dim), finite (anything else is redone)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return (array.dtype == np.float32 and array.shape == (frames, dim) and bool(np.isfinite(array).all()))


def _copy_metadata(source: Path, out: Path) -> list[str]:
    copied = []
    for name in ("VideoDemographics.csv", "finishedResponses.csv", "processedResults"):
        item = source / name
        target = out / name
        if target.exists() or not item.exists():
            continue
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)
        copied.append(name)
    return copied


def extract(
    videos: Path,
    encoder_path: Path,
    out: Path,
    options: ExtractOptions = ExtractOptions(),
    *,
    workers: int = 1,
    metadata: Path | None = None,
    on_clip: Callable[[ClipReport], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Extract every video under ``videos`` into ``out``; returns the manifest (also written to extraction.json).

    ``metadata``: a CREMA-D folder whose VideoDemographics.csv and processedResults/ are copied alongside
    (default: the videos folder's parent when it has VideoDemographics.csv, as in CREMA-D's own layout).
    """
    if workers < 1 or workers > 64:
        raise ExtractionError(f"--workers must be in 1..64, got {workers}")
    decode.video_stack()  # a missing extra stops here, not once per clip
    if options.face == "haar":
        FaceFinder(options)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExtractionError(f"--out {out} is a file; give a folder for the dataset")
    if metadata is not None and not (Path(metadata) / "VideoDemographics.csv").is_file():
        raise ExtractionError(f"--metadata {metadata} has no VideoDemographics.csv")
    paths = find_videos(Path(videos))
    encoder = Encoder(encoder_path, options)
    features = out / "features"
    manifest_path = out / MANIFEST
    settings = {"options": asdict(options), "encoder_sha256": encoder.sha256}
    manifest: dict[str, Any] = {"version": MANIFEST_VERSION, **settings, "encoder": str(encoder.path),
                                "feature_dim": encoder.dim, "clips": {}}
    if manifest_path.exists():
        try:
            previous = json.loads(manifest_path.read_text(encoding="utf-8"))
            same = {k: previous.get(k) for k in settings} == settings and isinstance(previous.get("clips"), dict)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise ExtractionError(f"{manifest_path} is unreadable; choose another --out") from None
        if not same:
            raise ExtractionError(f"{out} was extracted with other options or another encoder; use another --out "
                                  "(or the same --frames/--face/--size/--margin/--normalize and encoder file)")
        manifest["clips"] = previous["clips"]
    elif out.exists() and any(out.iterdir()):
        raise ExtractionError(f"{out} is not empty and holds no {MANIFEST} (nothing says how its files were made); "
                              "choose another --out")
    source = Path(metadata) if metadata is not None else Path(videos).parent

    def save_manifest() -> None:
        counts = {"ok": 0, "failed": 0}
        for entry in manifest["clips"].values():
            counts[entry["status"]] = counts.get(entry["status"], 0) + 1
        manifest["summary"] = {"videos": len(paths), **counts}
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")

    try:
        features.mkdir(parents=True, exist_ok=True)
        save_manifest()  # the options and encoder are on disk before the first features file
        manifest["metadata_copied"] = _copy_metadata(source, out) if (source / "VideoDemographics.csv").is_file() \
            else []
    except OSError as exc:
        raise ExtractionError(f"cannot write to {out}: {exc.strerror or exc}") from None
    # clips whose video is gone: their features were ours, and training must not read them
    names = {p.stem for p in paths}
    for clip in [c for c in manifest["clips"] if c not in names]:
        (features / f"{clip}.npy").unlink(missing_ok=True)
        del manifest["clips"][clip]
    todo = [p for p in paths if not (manifest["clips"].get(p.stem, {}).get("status") == "ok"
                                     and _complete(features / f"{p.stem}.npy", options.frames, encoder.dim))]
    if on_start is not None:
        on_start(len(paths), len(paths) - len(todo))
    try:
        _run(todo, options, workers, encoder, features, manifest, on_clip, save_manifest)
    finally:  # an interrupted run still records the clips it finished
        save_manifest()
    return manifest


def _run(todo, options, workers, encoder, features, manifest, on_clip, save_manifest) -> None:
    last_saved = time.monotonic()
    for crops, report in _crops_of(todo, options, workers):
        target = features / f"{report.clip}.npy"
        target.unlink(missing_ok=True)  # never a stale file: the entry and the file change together
        if crops is not None:
            started = time.perf_counter()
            try:
                vectors = encoder(crops)
            except EncoderError as exc:  # this clip's output (NaN, say); the shape was checked at startup
                report.error = f"encoder: {exc}"
            else:
                report.seconds["encode"] = time.perf_counter() - started
                _atomic_save(target, vectors)
                report.status = "ok"
        manifest["clips"][report.clip] = asdict(report)
        if on_clip is not None:
            on_clip(report)
        if time.monotonic() - last_saved > 5.0:
            save_manifest()
            last_saved = time.monotonic()


def _crops_of(paths: list[Path], options: ExtractOptions, workers: int) -> Iterator[tuple[np.ndarray | None, ClipReport]]:
    """Each clip's crops, in order; decoding and face finding in ``workers`` processes."""
    if workers == 1 or len(paths) < 2:
        for path in paths:
            yield clip_crops(path, options)
        return
    from concurrent.futures.process import BrokenProcessPool

    # spawned, not forked: a fork copies FFmpeg's state (a scaler whose slice threads exist only in this process)
    # and a child that scales with it waits for them forever (CI hung so, stops 43-44)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        pending = [pool.submit(clip_crops, path, options) for path in paths[: 2 * workers]]
        at = len(pending)
        while pending:
            try:
                result = pending.pop(0).result()
            except BrokenProcessPool:
                raise ExtractionError("a worker process died (out of memory?); re-run to resume, perhaps with "
                                      "fewer --workers") from None
            if at < len(paths):
                pending.append(pool.submit(clip_crops, paths[at], options))
                at += 1
            yield result
