"""Real sequence data that packages ship, laid out as privfer clips: test beds privfer did not design.

Defaults fitted on privfer's own generator can fit the generator rather than
the problem (issue 26). These sources let every run, study and benchmark try
real data with nothing downloaded — the files are inside the installed
packages (``pip install -e ".[foreign]"``):

* ``digits`` — scikit-learn's handwritten digits (UCI optdigits, CC BY 4.0):
  the digits 0-5 as six classes, each 8 x 8 image read as **8 frames** (its
  rows, top to bottom) of **8 features** (pixel values / 16). The class lives
  in the order of the rows. No writer ids ship, so the 1,080 records are
  dealt to 91 actors by a fixed permutation (about 12 each, 2 per class).
* ``watch`` — seglearn's smartwatch recordings of shoulder exercises (10
  subjects, 7 exercises, each on both sides; 50 Hz accelerometer and
  gyroscope): the first six exercises (PEN, ABD, FEL, IR, ER, TRAP; ROW is
  left out, privfer has six classes) cut into non-overlapping 3 s windows,
  each **30 frames** (means of 5 samples, 10 Hz) of **6 features**. The
  actors are the real subjects (1001-1010), so the default split of 12 + 12
  held-out actors does not fit: set ``data.split.val_actors`` and
  ``test_actors`` (e.g. 2 and 2).

Class k is stored as privfer's emotion k (anger, disgust, fear, happiness,
neutral, sadness in that order; the names mean nothing here), with one vote for
it, so partial labels are one-hot. Actors get alternating sexes (the data has
none) so the balanced split works. Clip names keep the CREMA-D form, the
sentence and level numbering an actor's records of one class.
"""

from __future__ import annotations

import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np

from privfer.config.sections import FOREIGN_SHAPES
from privfer.data.clips import LEVELS, NUM_CLASSES, SENTENCES, Actor, ClipSet, clip_name
from privfer.errors import DataError

SOURCES = tuple(FOREIGN_SHAPES)
SHAPES = FOREIGN_SHAPES  # (frames, features per frame)
_FIRST_ACTOR = 1001
_DIGITS_ACTORS = 91
_WATCH_WINDOW, _WATCH_POOL = 150, 5  # 3 s at 50 Hz, averaged over 5 samples per frame
_MAX_WATCH_BYTES = 64 << 20  # the shipped file is 18 MB


def load_foreign(source: str) -> ClipSet:
    """The clips of a package data set (``SOURCES``); DataError when its package is not installed."""
    if source == "digits":
        features, classes, actors = _digits()
    elif source == "watch":
        features, classes, actors = _watch()
    else:
        raise DataError(f"unknown data source {source!r}; expected one of {', '.join(SOURCES)}")
    return _clipset(source, features, classes, actors)


def _package_dir(package: str, extra: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.source needs the package {package!r}, which ships the data: pip install -e "
                        f"\".[{extra}]\"")
    return Path(next(iter(spec.submodule_search_locations)))


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    _package_dir("sklearn", "foreign")
    from sklearn.datasets import load_digits  # reads sklearn/datasets/data/digits.csv.gz; never downloads

    data = load_digits()
    keep = data.target < NUM_CLASSES
    features = (data.images[keep] / 16.0).astype(np.float32)  # (n, 8 rows, 8 columns)
    classes = data.target[keep].astype(np.int64)
    # no writer ids ship: deal the records to actors by a fixed permutation, so every actor has every class
    order = np.random.default_rng(np.random.SeedSequence([0, 0x44494749])).permutation(len(classes))  # "DIGI"
    actors = np.empty(len(classes), dtype=np.int64)
    actors[order] = np.arange(len(classes)) % _DIGITS_ACTORS
    return features, classes, actors + _FIRST_ACTOR


def _latin1(text: str, encoding: str) -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin-1 text is decoded")
    return text.encode("latin-1")


class _ArraysOnly(pickle.Unpickler):
    """Unpickles the watch file's dict of numpy arrays and lists, and nothing else (no other class is built)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) == ("_codecs", "encode"):  # how a protocol-2 pickle stores an array's bytes
            return _latin1
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not an array type")
        return super().find_class(module, name)


def _watch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = _package_dir("seglearn", "foreign") / "data" / "watch_dataset.npy"
    if not path.is_file() or path.stat().st_size > _MAX_WATCH_BYTES:
        raise DataError(f"{path} is missing or larger than {_MAX_WATCH_BYTES} bytes; reinstall seglearn")
    # seglearn stores a pickled dict in a .npy; read it without importing seglearn (whose import needs pandas)
    # and with an unpickler that builds numpy arrays only
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with path.open("rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            shape, _, dtype = read_header[version](handle)
        except (ValueError, KeyError, SyntaxError) as exc:
            raise DataError(f"{path} is not a .npy file privfer reads ({exc.__class__.__name__})") from None
        if dtype != np.dtype(object) or shape != ():
            raise DataError(f"{path} is not seglearn's watch data (a pickled dict)")
        try:
            document = _ArraysOnly(io.BytesIO(handle.read())).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise DataError(f"{path} is not seglearn's watch data ({exc})") from None
    if isinstance(document, np.ndarray) and document.shape == ():
        document = document.item()
    try:
        recordings, labels, subjects = document["X"], np.asarray(document["y"]), np.asarray(document["subject"])
    except (TypeError, KeyError, IndexError):
        raise DataError(f"{path} is not seglearn's watch data (no X, y and subject)") from None
    windows, classes, actors = [], [], []
    for recording, label, subject in zip(recordings, labels, subjects):
        if not 0 <= label < NUM_CLASSES:  # the seventh exercise (ROW): privfer has six classes
            continue
        samples = np.asarray(recording, dtype=np.float64)
        for start in range(0, len(samples) - _WATCH_WINDOW + 1, _WATCH_WINDOW):
            window = samples[start:start + _WATCH_WINDOW]
            windows.append(window.reshape(-1, _WATCH_POOL, window.shape[1]).mean(axis=1))
            classes.append(int(label))
            actors.append(_FIRST_ACTOR - 1 + int(subject))
    return np.stack(windows).astype(np.float32), np.array(classes, dtype=np.int64), np.array(actors, dtype=np.int64)


def _clipset(source: str, features: np.ndarray, classes: np.ndarray, actors: np.ndarray) -> ClipSet:
    """Clips named as CREMA-D's: an actor's k-th record of a class gets sentence k mod 12 and level k // 12."""
    if features.shape[1:] != SHAPES[source]:
        raise DataError(f"{source}: records of shape {features.shape[1:]}, expected {SHAPES[source]}")
    seen: dict[tuple[int, int], int] = {}
    names = []
    for actor, label in zip(actors.tolist(), classes.tolist()):
        k = seen.get((actor, label), 0)
        seen[(actor, label)] = k + 1
        if k >= len(SENTENCES) * len(LEVELS):
            raise DataError(f"{source}: actor {actor} has more than {len(SENTENCES) * len(LEVELS)} records of "
                            f"class {label}, more than clip names can tell apart")
        names.append(clip_name(actor, SENTENCES[k % len(SENTENCES)], label, LEVELS[k // len(SENTENCES)]))
    ids = sorted(set(actors.tolist()))
    return ClipSet(
        names=np.array(names),
        features=np.ascontiguousarray(features),
        votes=np.eye(NUM_CLASSES, dtype=np.int64)[classes],
        intended=classes,
        actor_ids=actors,
        actors={a: Actor(actor_id=a, sex=("Male", "Female")[i % 2], age=None) for i, a in enumerate(ids)},
        meta={"source": source},
    )


__all__ = ["SHAPES", "SOURCES", "load_foreign"]
