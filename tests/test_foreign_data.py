"""Real data that packages ship (privfer/data/foreign.py): shapes, actors, labels, and the file is read safely."""

import io
import pickle
from pathlib import Path

import numpy as np
import pytest

from privfer.config import load_config
from privfer.data import load_clips
from privfer.data.clips import parse_clip_name
from privfer.data.splits import split_actors
from privfer.errors import ConfigError, DataError

pytest.importorskip("sklearn", reason="the foreign data extra (pip install -e '.[foreign]') is not installed")


def clips_of(source, *overrides):
    return load_clips(load_config(None, [f"data.source={source}", *overrides]).data)


def test_digits_are_six_classes_of_eight_rows_dealt_to_91_actors():
    clips = clips_of("digits")
    assert clips.features.shape == (1083, 8, 8) and clips.features.dtype == np.float32
    assert 0.0 <= clips.features.min() and clips.features.max() <= 1.0
    assert sorted(np.unique(clips.intended).tolist()) == list(range(6))
    per_actor = np.bincount(clips.actor_ids - 1001)
    assert len(clips.actors) == 91 and per_actor.min() >= 11 and per_actor.max() <= 12
    # one vote each: partial labels are the class itself
    np.testing.assert_array_equal(clips.votes.argmax(axis=1), clips.intended)
    assert (clips.votes.sum(axis=1) == 1).all()
    assert len(set(clips.names.tolist())) == len(clips)
    for name, actor, label in zip(clips.names[:40], clips.actor_ids[:40], clips.intended[:40]):
        assert parse_clip_name(name)[0] == actor and parse_clip_name(name)[2] == label
    again = clips_of("digits")
    np.testing.assert_array_equal(again.features, clips.features)
    np.testing.assert_array_equal(again.actor_ids, clips.actor_ids)
    # the default split works: 67 training actors, as CREMA-D's
    assert len(split_actors(clips, load_config(None, []).data.split, seed=0).train) == 67


def test_digits_carry_their_class_in_the_order_of_the_rows():
    """What makes the set a test of transfer: the rows' order, not their mean, tells 0-5 apart."""
    clips = clips_of("digits")
    train = clips.actor_ids < 1070

    def accuracy(x):
        x = np.c_[x, np.ones(len(x))]
        y = np.eye(6)[clips.intended]
        w = np.linalg.solve(x[train].T @ x[train] + 0.1 * np.eye(x.shape[1]), x[train].T @ y[train])
        return float(((x[~train] @ w).argmax(axis=1) == clips.intended[~train]).mean())

    assert accuracy(clips.features.reshape(len(clips), -1)) > 0.9
    assert accuracy(clips.features.mean(axis=1)) < accuracy(clips.features.reshape(len(clips), -1)) - 0.05


def test_watch_windows_belong_to_the_ten_real_subjects():
    clips = clips_of("watch", "data.split.val_actors=2", "data.split.test_actors=2")
    assert clips.features.shape[1:] == (30, 6) and len(clips) > 1000
    assert sorted(clips.actors) == list(range(1001, 1011))
    assert sorted(np.unique(clips.intended).tolist()) == list(range(6))
    # every subject did every exercise
    for actor in clips.actors:
        assert len(np.unique(clips.intended[clips.actor_ids == actor])) == 6
    split = split_actors(clips, load_config(None, ["data.split.val_actors=2", "data.split.test_actors=2"]).data.split, 0)
    assert len(split.train) == 6


def test_shapes_are_fixed_and_the_default_split_is_refused_with_the_fix():
    config = load_config(None, ["data.source=digits"]).data
    assert (config.frames, config.feature_dim) == (8, 8)
    with pytest.raises(ConfigError, match="frames = 16, but data.source 'digits' has frames = 8"):
        load_config(None, ["data.source=digits", "data.frames=16"])
    clips = clips_of("watch")
    with pytest.raises(ConfigError, match="val_actors \\+ test_actors = 24 leaves no training actor"):
        split_actors(clips, load_config(None, []).data.split, 0)


class _Call:
    """Pickles as ``fn(*args)`` then BUILD with ``state``: a crafted stream that names only the globals numpy's
    own array pickles use (numpy.ndarray, numpy.dtype, _reconstruct)."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


class _Boom:
    def __reduce__(self):
        return (print, ("code ran",))


def _write_watch(package, payload):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": ()})
    (package / "data").mkdir(parents=True, exist_ok=True)
    (package / "data" / "watch_dataset.npy").write_bytes(header.getvalue() + payload)


@pytest.fixture
def fake_watch(tmp_path, monkeypatch):
    """Write a payload as seglearn's file in a fake package and return a loader for it."""
    from privfer.data import foreign

    package = tmp_path / "seglearn"
    monkeypatch.setattr(foreign, "_package_dir", lambda *_: package)

    def load(document=None, payload=None, protocol=2):
        _write_watch(package, payload if payload is not None else pickle.dumps(
            np.array(document, dtype=object) if isinstance(document, dict) else document, protocol=protocol))
        return foreign.load_foreign("watch")

    return load


GOOD = {"X": [np.zeros((300, 6))], "y": np.array([0]), "subject": np.array([1])}


def test_the_watch_reader_reads_numpys_array_pickles(fake_watch):
    for protocol in (2, 3):  # the shipped file's, and np.save's
        clips = fake_watch(GOOD, protocol=protocol)
        assert clips.features.shape == (2, 30, 6) and sorted(clips.actors) == [1001]
    clips = fake_watch({**GOOD, "X": [np.arange(1800.0).reshape(300, 6)]})
    np.testing.assert_allclose(clips.features[0, 0], np.arange(12.0, 18.0))  # the mean of rows 0-4


def test_the_watch_reader_refuses_any_other_global(fake_watch):
    with pytest.raises(DataError, match="is not an array type"):
        fake_watch({**GOOD, "hook": _Boom()})


def test_a_forged_object_pointer_is_refused_not_dereferenced():
    """numpy's dtype.__setstate__ can clear an object dtype's flags, after which ndarray.__setstate__ takes raw
    bytes as PyObject pointers (a crash, or any object at a known address). Run in a child: a regression would
    crash the interpreter rather than fail."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent('''
        import io, pickle, struct, sys, tempfile, pathlib
        import numpy as np
        from numpy._core.multiarray import _reconstruct
        sys.path.insert(0, %r)
        from test_foreign_data import _Call, _write_watch
        from privfer.data import foreign
        from privfer.errors import DataError
        flags_cleared = _Call(np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 0))
        forged = _Call(_reconstruct, (np.ndarray, (0,), b"b"), (1, (), flags_cleared, False, struct.pack("<Q", 0x4141414141414141)))
        package = pathlib.Path(tempfile.mkdtemp()) / "seglearn"
        _write_watch(package, pickle.dumps(forged, protocol=2))
        foreign._package_dir = lambda *_: package
        try:
            foreign.load_foreign("watch")
        except DataError as exc:
            print("refused:", exc)
    ''') % str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "unexpected dtype state" in done.stdout


def test_small_files_cannot_ask_for_huge_work(fake_watch):
    from numpy._core.multiarray import _reconstruct

    # 10^12 rows backed by 48 bytes through zero strides: numpy.ndarray is not callable from the file
    with pytest.raises(DataError):
        fake_watch(payload=pickle.dumps({**GOOD, "X": [_Call(np.ndarray, ((10**12, 6), np.dtype("<f8"), b"\0" * 48,
                                                                         0, (0, 8)))]}, protocol=2))
    # an array whose bytes do not match its shape
    short = _Call(_reconstruct, (np.ndarray, (0,), b"b"), (1, (10**9, 6), np.dtype("<f8"), False, b"\0" * 48))
    with pytest.raises(DataError, match="more than|do not match"):
        fake_watch(payload=pickle.dumps({**GOOD, "X": [short]}, protocol=2))
    # one honest recording referenced 20,000 times through the pickle memo: bounded before any window is cut
    many = 20_000
    with pytest.raises(DataError, match="recordings|rows in all"):
        fake_watch({"X": [np.zeros((2618, 6))] * many, "y": np.zeros(many, dtype=np.int8),
                    "subject": np.ones(many, dtype=np.int8)}, protocol=4)


@pytest.mark.parametrize("change, message", [
    ({"y": np.array(["a"])}, "dtype .U1. is not one the watch data uses"),
    ({"y": np.array([0, 1])}, "y is not one integer per recording"),
    ({"y": np.array([0.5])}, "y is not one integer per recording"),
    ({"y": np.array([7])}, "exercise outside 0-6"),
    ({"subject": np.array([10**6])}, "subject outside 1-999"),
    ({"subject": np.array([-5])}, "subject outside 1-999"),
    ({"X": [np.zeros((300, 7))]}, "rows of 6 numbers"),
    ({"X": [np.zeros(300)]}, "rows of 6 numbers"),
    ({"X": [np.full((300, 6), np.nan)]}, "NaN or infinite"),
    ({"X": [np.full((300, 6), 1e300)]}, "too large for float32"),
    ({"X": [np.zeros((149, 6))]}, "no recording"),
    ({"X": []}, "X is not a list"),
    ({"X": None}, "X is not a list"),
])
def test_a_malformed_watch_file_is_a_data_error(fake_watch, change, message):
    with pytest.raises(DataError, match=message):
        fake_watch({**GOOD, **change})


def test_garbage_and_other_documents_are_data_errors(fake_watch):
    with pytest.raises(DataError, match="no X, y and subject"):
        fake_watch([1, 2])
    with pytest.raises(DataError):
        fake_watch(payload=b"\x80\x02K\x01}q\x00b.")  # BUILD on an int
    with pytest.raises(DataError):
        fake_watch(payload=b"\x80\x02X\x01\x00\x00\x00aQ.")  # a persistent id
    with pytest.raises(DataError, match="latin-1"):
        fake_watch(payload=b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf-8\x86R.")


def test_a_file_that_is_not_npy_is_a_data_error(tmp_path, monkeypatch):
    from privfer.data import foreign

    package = tmp_path / "seglearn"
    (package / "data").mkdir(parents=True)
    (package / "data" / "watch_dataset.npy").write_bytes(b"\x93NUMPY garbage")
    monkeypatch.setattr(foreign, "_package_dir", lambda *_: package)
    with pytest.raises(DataError, match="not a .npy file"):
        foreign.load_foreign("watch")


def test_a_missing_package_is_a_clear_error(monkeypatch):
    from privfer.data import foreign

    monkeypatch.setattr(foreign.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install -e \".\\[foreign\\]\""):
        foreign.load_foreign("watch")
