from collections import Counter

import numpy as np
import pytest

from privfer.config import SplitConfig, load_config
from privfer.data.splits import split_actors
from privfer.data.synthetic import generate_synthetic
from privfer.errors import ConfigError


@pytest.fixture(scope="module")
def cremad_sized():
    return generate_synthetic(load_config(None, ["data.frames=2", "data.feature_dim=2"]).data)


def test_seed_paper_split(cremad_sized):
    split = split_actors(cremad_sized, SplitConfig(), seed=0)
    assert (len(split.train), len(split.val), len(split.test)) == (67, 12, 12)
    assert not (set(split.train) & set(split.val) or set(split.train) & set(split.test) or set(split.val) & set(split.test))
    assert set(split.train) | set(split.val) | set(split.test) == set(cremad_sized.actors)
    for group in (split.val, split.test):
        assert Counter(cremad_sized.actors[a].sex for a in group) == {"Male": 6, "Female": 6}


def test_split_is_seeded(cremad_sized):
    assert split_actors(cremad_sized, SplitConfig(), 5) == split_actors(cremad_sized, SplitConfig(), 5)
    assert split_actors(cremad_sized, SplitConfig(), 5).test != split_actors(cremad_sized, SplitConfig(), 6).test


def test_test_actors_clips_are_halved_per_actor_and_emotion(cremad_sized):
    split = split_actors(cremad_sized, SplitConfig(), seed=1)
    adapt, evaluate = set(split.adaptation_clips), set(split.evaluation_clips)
    assert not adapt & evaluate
    test_clips = set(cremad_sized.names[np.isin(cremad_sized.actor_ids, split.test)])
    assert adapt | evaluate == test_clips
    for actor in split.test:
        mine = {n for n in test_clips if n.startswith(f"{actor}_")}
        a, e = len(mine & adapt), len(mine & evaluate)
        assert abs(a - e) <= 6  # at most one odd clip per emotion
        for code in ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD"):
            assert any(f"_{code}_" in n for n in mine & adapt) and any(f"_{code}_" in n for n in mine & evaluate)


def test_impossible_splits_are_config_errors(cremad_sized):
    with pytest.raises(ConfigError, match="leaves no training actor"):
        split_actors(cremad_sized, SplitConfig(val_actors=45, test_actors=46), 0)
    with pytest.raises(ConfigError, match="data.split.val_actors = 88 needs 44 Female actors for balanced gender, only 42 are left"):
        split_actors(cremad_sized, SplitConfig(val_actors=88, test_actors=2), 0)
