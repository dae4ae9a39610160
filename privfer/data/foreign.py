"""Real sequence data that packages ship, laid out as privfer clips: test beds privfer did not design.

Defaults fitted on privfer's own generator can fit the generator rather than
the problem (issue 26). These sources let every run, study and benchmark try
real data with nothing downloaded — the files are inside the installed
packages (``pip install -e ".[foreign]"``):

* ``digits`` — scikit-learn's handwritten digits (UCI optdigits, CC BY 4.0):
  the digits 0-5 as six classes, each 8 x 8 image read as **8 frames** (its
  rows, top to bottom) of **8 features** (pixel values / 16). The class lives
  in the order of the rows. No writer ids ship, so the 1,083 records are
  dealt to 91 actors by a fixed rule (within each class, in the file's order,
  round robin from a class's own starting actor): 11-12 records each, one or
  two of every class.
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
import math
import pickle
from pathlib import Path

import numpy as np

from privfer.config.sections import FOREIGN_SHAPES
from privfer.data.clips import LEVELS, NUM_CLASSES, SENTENCES, Actor, ClipSet, clip_name
from privfer.errors import DataError

_FIRST_ACTOR = 1001
_DIGITS_ACTORS = 91
_WATCH_WINDOW, _WATCH_POOL = 150, 5  # 3 s at 50 Hz, averaged over 5 samples per frame
_MAX_WATCH_BYTES = 64 << 20  # the shipped file is 18 MB


def load_foreign(source: str) -> ClipSet:
    """The clips of a package data set (a key of ``FOREIGN_SHAPES``); DataError when its package is not installed."""
    if source == "digits":
        features, classes, actors = _digits()
    elif source == "watch":
        features, classes, actors = _watch()
    else:
        raise DataError(f"unknown data source {source!r}; expected one of {', '.join(FOREIGN_SHAPES)}")
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
    # no writer ids ship: deal each class's records round robin (no random stream whose numpy version could change
    # the dealing), each class starting where the previous one stopped, so every actor has every class
    actors = np.empty(len(classes), dtype=np.int64)
    start = 0
    for label in range(NUM_CLASSES):
        index = np.flatnonzero(classes == label)
        actors[index] = (start + np.arange(len(index))) % _DIGITS_ACTORS
        start += len(index)
    return features, classes, actors + _FIRST_ACTOR


def _latin1(text: str, encoding: str) -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin-1 text is decoded")
    return text.encode("latin-1")


# The watch file needs exactly these dtypes; numpy objects are built by privfer from validated plain data, never by
# numpy's own __setstate__ (whose states can forge object pointers, field offsets and item sizes).
_PLAIN_DTYPES = {spec: np.dtype(spec) for spec in ("O8", "f8", "f4", "i8", "i4", "i2", "i1", "u1", "b1")}
_MAX_ELEMENTS = 8 << 20  # numbers over all arrays in the file (the shipped one has ~1.5M)
_NDARRAY = object()  # what find_class hands out for numpy.ndarray: a marker, not the class


class _Dtype:
    """numpy.dtype(spec, align, copy) of one of _PLAIN_DTYPES; its pickled state must be the plain one."""

    def __init__(self, spec, align=False, copy=False):
        if spec not in _PLAIN_DTYPES or align not in (0, False):
            raise pickle.UnpicklingError(f"dtype {spec!r} is not one the watch data uses")
        self.dtype = _PLAIN_DTYPES[spec]

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[2:7] == (None,) * 3 + (-1, -1)
                and state[7] == self.dtype.flags):
            raise pickle.UnpicklingError("unexpected dtype state")
        if state[1] not in ("<", "|", "="):
            raise pickle.UnpicklingError("only little-endian data is read")


class _Array:
    """_reconstruct(ndarray, (0,), b"b") then BUILD: becomes a fresh array checked against the element budget."""

    def __init__(self, unpickler):
        self.unpickler, self.array = unpickler, None

    def __setstate__(self, state):
        if self.array is not None or not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("unexpected array state")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _Dtype) or not isinstance(shape, tuple) or len(shape) > 2 or not all(
                type(n) is int and n >= 0 for n in shape) or not isinstance(fortran, bool):
            raise pickle.UnpicklingError("unexpected array state")
        count = math.prod(shape)
        self.unpickler.budget -= count
        if self.unpickler.budget < 0:
            raise pickle.UnpicklingError(f"more than {_MAX_ELEMENTS} numbers")
        order = "F" if fortran else "C"
        if dtype.dtype.hasobject:
            if not isinstance(raw, list) or len(raw) != count:
                raise pickle.UnpicklingError("unexpected object array")
            array = np.empty(count, dtype=object)
            for i, item in enumerate(raw):  # one by one: a list item stays a list, never broadcast
                array[i] = item
            self.array = array.reshape(shape, order=order)
        else:
            if not isinstance(raw, bytes) or len(raw) != count * dtype.dtype.itemsize:
                raise pickle.UnpicklingError("array bytes do not match its shape")
            self.array = np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order=order).copy()


class _ArraysOnly(pickle.Unpickler):
    """Unpickles the watch file's dict of numpy arrays and lists into plain data, and nothing else."""

    def __init__(self, file):
        super().__init__(file)
        self.budget = _MAX_ELEMENTS

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) == ("_codecs", "encode"):  # how a protocol-2 pickle stores an array's bytes
            return _latin1
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        if (module, name) == ("numpy", "dtype"):
            return _Dtype
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return self._reconstruct
        raise pickle.UnpicklingError(f"{module}.{name} is not an array type")

    def _reconstruct(self, kind, shape, typecode):
        if kind is not _NDARRAY or shape != (0,) or typecode != b"b":
            raise pickle.UnpicklingError("unexpected array reconstruction")
        return _Array(self)


def _resolved(document):
    """The document with every _Array replaced by its array (iteratively: no recursion on deep nesting)."""
    def plain(item):
        if isinstance(item, _Array):
            if item.array is None:
                raise pickle.UnpicklingError("an array without its state")
            return item.array
        if isinstance(item, _Dtype):
            raise pickle.UnpicklingError("a bare dtype")
        return item

    nested = (list, dict, tuple, np.ndarray)
    root = [document]
    stack, seen = [root], set()
    while stack:
        container = stack.pop()
        if id(container) in seen:
            continue
        seen.add(id(container))
        if isinstance(container, dict):
            pairs = list(container.items())
            container.clear()
            container.update((plain(k), plain(v)) for k, v in pairs)
            stack.extend(v for v in container.values() if isinstance(v, nested))
        elif isinstance(container, list):
            container[:] = [plain(v) for v in container]
            stack.extend(v for v in container if isinstance(v, nested))
        elif isinstance(container, np.ndarray) and container.dtype.hasobject:
            for index in np.ndindex(container.shape):  # in place, whatever the array's memory order
                container[index] = plain(container[index])
                if isinstance(container[index], nested):
                    stack.append(container[index])
        elif isinstance(container, tuple):  # immutable: the watch file keeps no array in one
            if any(isinstance(v, (_Array, _Dtype)) for v in container):
                raise pickle.UnpicklingError("an array inside a tuple")
            stack.extend(v for v in container if isinstance(v, nested))
    return root[0]


_MAX_RECORDINGS, _MAX_ROWS, _MAX_TOTAL_ROWS = 10_000, 100_000, 2_000_000  # shipped: 140, 2,618, 244,102


def _watch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = _package_dir("seglearn", "foreign") / "data" / "watch_dataset.npy"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall seglearn")
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with path.open("rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            shape, _, dtype = read_header[version](handle)
        except (ValueError, KeyError, SyntaxError) as exc:
            raise DataError(f"{path} is not a .npy file privfer reads ({exc.__class__.__name__})") from None
        if dtype != np.dtype(object) or shape != ():
            raise DataError(f"{path} is not seglearn's watch data (a pickled dict)")
        payload = handle.read(_MAX_WATCH_BYTES + 1)  # the cap on what is read, not on a stat taken earlier
    if len(payload) > _MAX_WATCH_BYTES:
        raise DataError(f"{path} is larger than {_MAX_WATCH_BYTES} bytes; reinstall seglearn")
    try:
        document = _resolved(_ArraysOnly(io.BytesIO(payload)).load())
    except MemoryError:
        raise DataError(f"{path} is not seglearn's watch data (too large)") from None
    except Exception as exc:  # noqa: BLE001 - whatever a tampered pickle raises is a data error
        raise DataError(f"{path} is not seglearn's watch data ({exc.__class__.__name__}: {exc})"[:500]) from None
    if isinstance(document, np.ndarray) and document.shape == () and document.dtype.hasobject:
        document = document.item()
    bad = f"{path} is not seglearn's watch data"
    if not isinstance(document, dict) or not {"X", "y", "subject"} <= document.keys():
        raise DataError(f"{bad} (no X, y and subject)")
    recordings, labels, subjects = document["X"], document["y"], document["subject"]
    if not isinstance(recordings, list) or not 0 < len(recordings) <= _MAX_RECORDINGS:
        raise DataError(f"{bad} (X is not a list of 1 to {_MAX_RECORDINGS} recordings)")
    for name, values in (("y", labels), ("subject", subjects)):
        if not (isinstance(values, np.ndarray) and values.dtype.kind in "iu" and values.shape == (len(recordings),)):
            raise DataError(f"{bad} ({name} is not one integer per recording)")
    if labels.min() < 0 or labels.max() > 6 or subjects.min() < 1 or subjects.max() > 999:
        raise DataError(f"{bad} (exercise outside 0-6 or subject outside 1-999)")
    total, width = 0, FOREIGN_SHAPES["watch"][1]
    for i, recording in enumerate(recordings):
        if not (isinstance(recording, np.ndarray) and recording.dtype.kind == "f" and recording.ndim == 2
                and recording.shape[1] == width and 0 < len(recording) <= _MAX_ROWS):
            raise DataError(f"{bad} (recording {i} is not rows of {width} numbers, at most {_MAX_ROWS})")
        if not np.isfinite(recording).all():
            raise DataError(f"{bad} (recording {i} has a NaN or infinite value)")
        total += len(recording)
    if total > _MAX_TOTAL_ROWS:
        raise DataError(f"{bad} (more than {_MAX_TOTAL_ROWS} rows in all)")
    windows, classes, actors = [], [], []
    for recording, label, subject in zip(recordings, labels.tolist(), subjects.tolist()):
        if label >= NUM_CLASSES:  # the seventh exercise (ROW): privfer has six classes
            continue
        samples = recording.astype(np.float64)
        usable = len(samples) // _WATCH_WINDOW * _WATCH_WINDOW
        if usable:
            frames = samples[:usable].reshape(-1, _WATCH_WINDOW // _WATCH_POOL, _WATCH_POOL, samples.shape[1])
            windows.append(frames.mean(axis=2))
            classes.extend([label] * len(frames))
            actors.extend([_FIRST_ACTOR - 1 + subject] * len(frames))
    if not windows:
        raise DataError(f"{bad} (no recording of the first six exercises is {_WATCH_WINDOW} samples long)")
    with np.errstate(over="ignore"):  # checked next
        features = np.concatenate(windows).astype(np.float32)
    if not np.isfinite(features).all():  # values beyond float32's range
        raise DataError(f"{bad} (values too large for float32)")
    return features, np.array(classes, dtype=np.int64), np.array(actors, dtype=np.int64)


def _clipset(source: str, features: np.ndarray, classes: np.ndarray, actors: np.ndarray) -> ClipSet:
    """Clips named as CREMA-D's: an actor's k-th record of a class gets sentence k mod 12 and level k // 12."""
    if features.shape[1:] != FOREIGN_SHAPES[source]:
        raise DataError(f"{source}: records of shape {features.shape[1:]}, expected {FOREIGN_SHAPES[source]}")
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


__all__ = ["load_foreign"]
