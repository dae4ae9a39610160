"""Real data that packages ship (privfer/data/foreign.py): shapes, actors, labels, and the file is read safely."""

import io

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


class _Boom:
    def __reduce__(self):
        return (print, ("code ran",))


def test_the_watch_reader_builds_arrays_and_nothing_else(tmp_path, monkeypatch):
    """The package's file is a pickle; a tampered one must not run code (only numpy arrays are built)."""
    from privfer.data import foreign

    package = tmp_path / "seglearn"
    (package / "data").mkdir(parents=True)
    document = {"X": [np.zeros((300, 6))], "y": np.array([0]), "subject": np.array([1]), "hook": _Boom()}
    buffer = io.BytesIO()
    np.save(buffer, np.array(document, dtype=object), allow_pickle=True)
    (package / "data" / "watch_dataset.npy").write_bytes(buffer.getvalue())
    monkeypatch.setattr(foreign, "_package_dir", lambda *_: package)
    with pytest.raises(DataError, match="is not an array type"):
        foreign.load_foreign("watch")
    del document["hook"]
    buffer = io.BytesIO()
    np.save(buffer, np.array(document, dtype=object), allow_pickle=True)
    (package / "data" / "watch_dataset.npy").write_bytes(buffer.getvalue())
    clips = foreign.load_foreign("watch")
    assert clips.features.shape == (2, 30, 6)
    (package / "data" / "watch_dataset.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match="not a .npy file"):
        foreign.load_foreign("watch")


def test_a_missing_package_is_a_clear_error(monkeypatch):
    from privfer.data import foreign

    monkeypatch.setattr(foreign.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install -e \".\\[foreign\\]\""):
        foreign.load_foreign("watch")
