import json

import numpy as np
import pytest
import yaml

from privfer.centralized import CHECKPOINT, train_centralized
from privfer.errors import RunDirectoryError

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
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "model.pt", "result.json", "split.json"]
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
    assert not list(run.glob(".*.tmp"))  # no half-written file left behind

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
