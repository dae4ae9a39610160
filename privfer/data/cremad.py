"""Reader (and writer) for a CREMA-D folder with precomputed per-frame features.

Layout (docs/data.md has the full contract)::

    ROOT/VideoDemographics.csv                 ActorID, Age, Sex, Race, Ethnicity
    ROOT/processedResults/tabulatedVotes.csv   unnamed row id, A, D, F, H, N, S, fileName, ...
    ROOT/finishedResponses.csv                 ..., queryType, clipName, respEmo, ...   (alternative votes)
    ROOT/features/<clipName>.npy               float array, frames x feature dims

Only visual-only judgements are used: in ``tabulatedVotes.csv`` the row id is
100000 * queryType + clipNum and queryType 2 is face-only, so those rows have
ids 2xxxxx; in ``finishedResponses.csv`` they are the rows with queryType == 2.
The clips are those with a feature file; privfer never extracts features or
downloads weights itself.
"""

from __future__ import annotations

from collections import Counter

import csv
import math
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from privfer.data.clips import EMOTION_CODES, NUM_CLASSES, VOTE_COLUMNS, Actor, ClipSet, parse_clip_name
from privfer.errors import DataError
from privfer.runs import current_umask

DEMOGRAPHICS = "VideoDemographics.csv"
TABULATED_VOTES = Path("processedResults") / "tabulatedVotes.csv"
RESPONSES = "finishedResponses.csv"
FEATURES = "features"
FACE_ONLY_QUERY = 2


def _read_csv(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise DataError(f"{path} is missing")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} cannot be read as CSV: {exc}") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(header) or 'none'})")
    return header, rows


def _whole_number(text: str, path: Path, line: int, what: str) -> int:
    """A non-negative whole number written as ``5`` or ``5.0``; anything else is a DataError."""
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path} line {line}: {what} {text!r} is not a number") from None
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise DataError(f"{path} line {line}: {what} {text!r} is not a non-negative whole number")
    return int(value)


def _read_demographics(root: Path) -> dict[int, Actor]:
    path = root / DEMOGRAPHICS
    _, rows = _read_csv(path, ("ActorID", "Age", "Sex"))
    actors: dict[int, Actor] = {}
    for line, row in enumerate(rows, start=2):
        actor_id = _whole_number(row["ActorID"], path, line, "ActorID")
        age = _whole_number(row["Age"], path, line, "Age") if row["Age"] else None
        sex = row["Sex"].capitalize()
        if sex not in ("Male", "Female"):
            raise DataError(f"{path} line {line}: Sex must be Male or Female, got {row['Sex']!r}")
        if actor_id in actors:
            raise DataError(f"{path} line {line}: ActorID {actor_id} is listed twice")
        actors[actor_id] = Actor(actor_id=actor_id, sex=sex, age=age)
    if not actors:
        raise DataError(f"{path} lists no actors")
    return actors


def _check_clip_name(name: str, path: Path, line: int) -> None:
    try:
        parse_clip_name(name)
    except ValueError as exc:
        raise DataError(f"{path} line {line}: {exc}") from None


def _read_tabulated_votes(root: Path) -> dict[str, np.ndarray]:
    path = root / TABULATED_VOTES
    header, rows = _read_csv(path, (*VOTE_COLUMNS, "fileName"))
    id_column = header[0]
    if id_column in (*VOTE_COLUMNS, "fileName"):
        raise DataError(f"{path} lacks the leading row-id column (100000 * queryType + clipNum)")
    votes: dict[str, np.ndarray] = {}
    for line, row in enumerate(rows, start=2):
        row_id = _whole_number(row[id_column], path, line, "row id")
        if row_id // 100000 != FACE_ONLY_QUERY:
            continue  # voice-only or audio-visual judgement
        name = row["fileName"]
        _check_clip_name(name, path, line)
        counts = np.array([_whole_number(row[c], path, line, f"vote count {c}") for c in VOTE_COLUMNS], np.int64)
        if name in votes:
            raise DataError(f"{path} line {line}: a second face-only row for clip {name}")
        votes[name] = counts
    return votes


_RESPONSE_CODES = {code: i for i, code in enumerate(VOTE_COLUMNS)} | {
    code: i for i, code in enumerate(EMOTION_CODES)
}


def _read_responses(root: Path) -> dict[str, np.ndarray]:
    path = root / RESPONSES
    _, rows = _read_csv(path, ("queryType", "clipName", "respEmo"))
    votes: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(NUM_CLASSES, dtype=np.int64))
    for line, row in enumerate(rows, start=2):
        query = _whole_number(row["queryType"], path, line, "queryType")
        if query != FACE_ONLY_QUERY:
            continue
        name = row["clipName"]
        _check_clip_name(name, path, line)
        code = row["respEmo"].upper()
        if code not in _RESPONSE_CODES:
            raise DataError(f"{path} line {line}: respEmo {row['respEmo']!r} is not one of {', '.join(VOTE_COLUMNS)}")
        votes[name][_RESPONSE_CODES[code]] += 1
    return dict(votes)


def _load_features(root: Path) -> tuple[list[str], np.ndarray]:
    folder = root / FEATURES
    if not folder.is_dir():
        raise DataError(f"{folder} is missing (one <clipName>.npy of frames x dims per clip)")
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise DataError(f"{folder} holds no .npy feature files")
    names, arrays = [], []
    for file in files:
        try:
            parse_clip_name(file.stem)
        except ValueError as exc:
            raise DataError(f"{file}: {exc}") from None
        try:
            array = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{file} is not a readable .npy array: {exc or 'empty file'}") from None
        real = np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
        if array.ndim != 2 or not real or min(array.shape) < 1:
            raise DataError(
                f"{file} must be a non-empty real-valued frames x dims array, got shape {array.shape} {array.dtype}"
            )
        if not np.all(np.isfinite(array)):
            raise DataError(f"{file} contains NaN or infinite values")
        names.append(file.stem)
        arrays.append(array.astype(np.float32, copy=False))
    shapes = Counter(a.shape for a in arrays)
    if len(shapes) > 1:  # name the odd files out, not whichever file happened to come after the first
        shape, count = shapes.most_common(1)[0]
        odd = [(n, a.shape) for n, a in zip(names, arrays) if a.shape != shape]
        raise DataError(f"{folder / (odd[0][0] + '.npy')} has shape {odd[0][1]}, but {count} of the {len(arrays)} "
                        f"clips have {shape} ({len(odd)} clips differ); all must be frames x dims alike")
    return names, np.stack(arrays)


def load_cremad(root: Path | str, votes: str = "tabulated") -> ClipSet:
    """Read a CREMA-D folder (see the module docstring); any problem is a :class:`DataError` naming the file."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is a file; --data (data.path) is a CREMA-D folder (features/, VideoDemographics.csv)")
    if not root.is_dir():
        raise DataError(f"CREMA-D folder {root} does not exist")
    actors = _read_demographics(root)
    if votes == "tabulated":
        vote_table, vote_file = _read_tabulated_votes(root), root / TABULATED_VOTES
    elif votes == "responses":
        vote_table, vote_file = _read_responses(root), root / RESPONSES
    else:
        raise DataError(f"votes must be 'tabulated' or 'responses', got {votes!r}")
    names, features = _load_features(root)

    actor_ids, intended, vote_rows = [], [], []
    for name in names:
        actor, _, emotion, _ = parse_clip_name(name)
        if actor not in actors:
            raise DataError(f"{root / FEATURES / (name + '.npy')}: actor {actor} is not in {root / DEMOGRAPHICS}")
        if name not in vote_table:
            raise DataError(f"{vote_file} has no visual-only (queryType 2) votes for clip {name}")
        if vote_table[name].sum() == 0:
            raise DataError(f"{vote_file}: clip {name} has zero visual-only votes")
        actor_ids.append(actor)
        intended.append(emotion)
        vote_rows.append(vote_table[name])
    used = set(actor_ids)
    return ClipSet(
        names=np.array(names),
        features=features,
        votes=np.stack(vote_rows),
        intended=np.array(intended, dtype=np.int64),
        actor_ids=np.array(actor_ids, dtype=np.int64),
        actors={a: actors[a] for a in sorted(used)},
        meta={"source": "cremad", "root": str(root), "votes": votes, "unused_vote_rows": len(vote_table) - len(names)},
    )


def export_cremad_layout(clips: ClipSet, root: Path | str) -> Path:
    """Write ``clips`` as a CREMA-D folder (demographics, face-only tabulated votes, features).

    Useful to inspect the contract, to hand synthetic data to other tools, and
    to test the reader. Voice-only rows are not written; face-only rows get ids
    200000 + clip number. The folder is built beside ``root`` and renamed into
    place, so a failure never leaves a partial copy; an existing ``root`` is refused.
    """
    root = Path(root)
    if root.exists() or root.is_symlink():
        raise DataError(f"{root} already exists; choose a new folder")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700
    except OSError as exc:
        raise DataError(f"cannot create {root}: {exc.strerror or exc}") from None
    try:
        _write_layout(clips, staging)
        os.rename(staging, root)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"cannot write {root}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def _write_layout(clips: ClipSet, root: Path) -> None:
    (root / FEATURES).mkdir(parents=True, exist_ok=True)
    (root / TABULATED_VOTES).parent.mkdir(parents=True, exist_ok=True)
    with (root / DEMOGRAPHICS).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ActorID", "Age", "Sex", "Race", "Ethnicity"])
        for actor in sorted(clips.actors.values(), key=lambda a: a.actor_id):
            writer.writerow([actor.actor_id, actor.age if actor.age is not None else "", actor.sex, "", ""])
    with (root / TABULATED_VOTES).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", *VOTE_COLUMNS, "fileName", "numResponses"])
        for number, (name, counts) in enumerate(zip(clips.names, clips.votes), start=1):
            writer.writerow([100000 * FACE_ONLY_QUERY + number, *counts.tolist(), name, int(counts.sum())])
    for name, array in zip(clips.names, clips.features):
        np.save(root / FEATURES / f"{name}.npy", array)
