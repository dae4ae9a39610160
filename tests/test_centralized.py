import json

import numpy as np
import pytest
import yaml

from privfer.centralized import CHECKPOINT, train_centralized
from privfer.errors import RunDirectoryError
from privfer.runs import load_checkpoint

from conftest import small_config


class Interrupted(Exception):
    pass


def test_vfer_learns_well_above_chance(small_clips):
    for labels in ("partial", "discrete"):
        result = train_centralized(small_config(f"training.labels={labels}"), clips=small_clips)
        assert result["test"]["macro"]["f1"] > 0.35, labels  # chance: about 1/6; seeds 0-4 give 0.42-0.54
        assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
        assert 1 <= result["best_epoch"] <= 6
        best = min(result["history"], key=lambda r: r["val_loss"])
        assert best["epoch"] == result["best_epoch"]


def test_run_directory_contents(tmp_path, small_clips):
    config = small_config("training.epochs=2")
    run = tmp_path / "run"
    result = train_centralized(config, run_dir=run, clips=small_clips)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "model.pt", "result.json", "run.json", "split.json"]
    assert yaml.safe_load((run / "config.yaml").read_text()) == config.to_dict()
    assert json.loads((run / "result.json").read_text())["test"] == json.loads(json.dumps(result["test"]))
    split = json.loads((run / "split.json").read_text())
    assert len(split["test"]) == 8 and not set(split["test"]) & set(split["train"])


def test_killed_run_resumes_to_the_same_result(tmp_path, small_clips):
    config = small_config("training.epochs=4")
    straight = train_centralized(config, clips=small_clips)

    run = tmp_path / "run"

    def die_after_two(record):
        if record.epoch == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_centralized(config, run_dir=run, on_epoch=die_after_two, clips=small_clips)
    assert (run / CHECKPOINT).exists() and not (run / "result.json").exists()

    seen = []
    resumed = train_centralized(config, run_dir=run, on_epoch=lambda r: seen.append(r.epoch), clips=small_clips)
    assert seen == [3, 4]  # only the missing epochs ran
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([h["val_loss"] for h in resumed["history"]],
                               [h["val_loss"] for h in straight["history"]], rtol=1e-5)
    assert resumed["test"] == straight["test"]
    assert not (run / CHECKPOINT).exists()

    # a finished run is not trained again
    again = train_centralized(config, run_dir=run, on_epoch=lambda r: seen.append(r.epoch), clips=small_clips)
    assert seen == [3, 4] and again["test"] == json.loads(json.dumps(straight["test"]))


def test_a_crash_while_writing_the_checkpoint_keeps_the_previous_one(tmp_path, small_clips, monkeypatch):
    import torch

    config = small_config("training.epochs=3")
    run = tmp_path / "run"
    real_save = torch.save
    saves = []

    def dying_save(obj, handle):
        saves.append(obj.get("epoch") if isinstance(obj, dict) else None)
        if obj.get("epoch") == 2:
            handle.write(b"half a checkpoint")
            raise Interrupted  # the process dies in the middle of the write
        real_save(obj, handle)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Interrupted):
        train_centralized(config, run_dir=run, clips=small_clips)
    monkeypatch.setattr(torch, "save", real_save)
    assert saves == [1, 2]
    assert load_checkpoint(run / CHECKPOINT, True)["epoch"] == 1  # the old checkpoint is intact
    assert not list(run.glob(".*.tmp"))
    resumed = train_centralized(config, run_dir=run, clips=small_clips)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]


def test_damaged_checkpoint_is_a_clear_error(tmp_path, small_clips):
    config = small_config("training.epochs=3")
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train_centralized(config, run_dir=run, clips=small_clips,
                          on_epoch=lambda r: (_ for _ in ()).throw(Interrupted))
    (run / CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(RunDirectoryError, match="checkpoint.pt is not a privfer checkpoint.*delete it to restart"):
        train_centralized(config, run_dir=run, clips=small_clips)


def test_bad_settings_fail_before_the_run_directory_is_written(tmp_path, small_clips):
    from privfer.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match="leaves no training actor"):
        train_centralized(small_config("data.split.val_actors=30", "data.split.test_actors=18"),
                          run_dir=tmp_path / "a", clips=small_clips)
    with pytest.raises(DataError, match="IFER weights file .* does not exist"):
        train_centralized(small_config(f"model.ifer_weights={tmp_path}/nope.pt"), run_dir=tmp_path / "b",
                          clips=small_clips)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_extreme_adaptation_fraction_keeps_both_halves(small_clips):
    result = train_centralized(small_config("training.epochs=1", "data.split.adaptation_fraction=0.99"),
                               clips=small_clips)
    assert result["data"]["test_eval_clips"] >= 8 * 6  # one clip per emotion per test actor at least


def test_run_files_are_readable_by_others(tmp_path, small_clips):
    import os
    import stat

    run = tmp_path / "run"
    train_centralized(small_config("training.epochs=1"), run_dir=run, clips=small_clips)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.yaml", "result.json", "model.pt"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~umask


def test_a_run_from_before_a_setting_existed_resumes_when_the_setting_is_at_its_default(tmp_path):
    from privfer.runs import prepare_run_dir

    run = tmp_path / "run"
    assert prepare_run_dir(run, small_config(), "train") is False
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["model"]["architecture"], saved["model"]["key_frames"]  # as a privfer before them wrote it
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert prepare_run_dir(run, small_config(), "train") is True  # it ran as their defaults do: resumed
    with pytest.raises(RunDirectoryError, match="model.architecture"):  # not at the default: another run
        prepare_run_dir(run, small_config("model.architecture=dual_stream"), "train")


def test_run_directory_of_another_config_is_refused(tmp_path, small_clips):
    run = tmp_path / "run"
    train_centralized(small_config("training.epochs=1"), run_dir=run, clips=small_clips)
    with pytest.raises(RunDirectoryError, match="holds a run with a different config"):
        train_centralized(small_config("training.epochs=2"), run_dir=run, clips=small_clips)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="is not a privfer run directory"):
        train_centralized(small_config("training.epochs=1"), run_dir=other, clips=small_clips)
    assert (other / "notes.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunDirectoryError, match="cannot be used"):
        train_centralized(small_config("training.epochs=1"), run_dir=tmp_path / "afile", clips=small_clips)
