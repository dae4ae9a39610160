"""Data with the label-noise problem (issue 27): noisy training labels injected after the split, hard synthetic clips.

The label-noise methods are judged on these, so what they inject has to be exactly what the docs say: the right
count of clips, only training actors, the votes of the acted and the wrong class swapped, and clean evaluation.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privfer.config import LabelNoiseConfig
from privfer.data.clips import NUM_CLASSES
from privfer.data.label_noise import NOISY, PAIRS, inject_label_noise, noise_targets
from privfer.data.labels import evaluation_labels
from privfer.data.splits import split_run
from privfer.data.synthetic import generate_synthetic
from privfer.errors import ConfigError, DataError
from privfer.fl.federation import prepare_federation
from privfer.fl.rounds import TRAINING

from conftest import small_config


@pytest.fixture(scope="module")
def parts(small_clips):
    config = small_config()
    return split_run(small_clips, config.data, config.seed)[1]


def test_pairs_are_an_involution_without_fixed_points_and_uniform_never_keeps_the_class():
    classes = np.arange(NUM_CLASSES)
    assert np.array_equal(PAIRS[PAIRS], classes) and not np.any(PAIRS == classes)
    # anger <-> disgust, fear <-> sadness, happiness <-> neutral (EMOTIONS' canonical order)
    assert PAIRS.tolist() == [1, 0, 5, 4, 3, 2]
    acted = np.repeat(classes, 2000)
    wrong = noise_targets(acted, "uniform", np.random.default_rng(0))
    assert not np.any(wrong == acted)
    counts = np.bincount((wrong - acted) % NUM_CLASSES, minlength=NUM_CLASSES)
    assert counts[0] == 0 and np.all(np.abs(counts[1:] / len(acted) - 0.2) < 0.02)  # the other five, uniformly


@settings(max_examples=25, deadline=None)
@given(rate=st.floats(0.0, 0.7), kind=st.sampled_from(["pair", "uniform"]), seed=st.integers(0, 5))
def test_exactly_the_rate_of_clips_is_corrupted_by_swapping_two_vote_counts(parts, rate, kind, seed):
    train = parts["train"]
    noisy = inject_label_noise(train, LabelNoiseConfig(rate=rate, kind=kind), seed)
    flag = noisy.flags[NOISY]
    assert flag.sum() == round(rate * len(train))
    # untouched clips are what they were; every clip keeps its annotators and its features
    assert np.array_equal(noisy.votes[~flag], train.votes[~flag]) and np.array_equal(noisy.intended[~flag],
                                                                                       train.intended[~flag])
    assert np.array_equal(noisy.votes.sum(axis=1), train.votes.sum(axis=1))
    assert np.array_equal(noisy.features, train.features) and np.array_equal(noisy.names, train.names)
    rows = np.flatnonzero(flag)
    acted, wrong = train.intended[rows], noisy.intended[rows]
    assert not np.any(acted == wrong)
    if kind == "pair":
        assert np.array_equal(wrong, PAIRS[acted])
    assert np.array_equal(noisy.votes[rows, wrong], train.votes[rows, acted])
    assert np.array_equal(noisy.votes[rows, acted], train.votes[rows, wrong])
    # only clips whose annotators preferred the acted class to the wrong one: every corrupted clip's votes change,
    # and the wrong class now leads the acted one by what the acted one led
    assert np.all(train.votes[rows, acted] > train.votes[rows, wrong])
    assert np.all(noisy.votes[rows, wrong] > noisy.votes[rows, acted])
    others = np.ones_like(train.votes[rows], dtype=bool)
    others[np.arange(len(rows)), acted] = others[np.arange(len(rows)), wrong] = False
    assert np.array_equal(noisy.votes[rows][others], train.votes[rows][others])
    # the frames that showed the acted class now name the wrong one; the rest keep their labels
    before, after = train.frame_labels[rows], noisy.frame_labels[rows]
    assert np.array_equal(after[before == acted[:, None]], np.broadcast_to(wrong[:, None], before.shape)[
        before == acted[:, None]])
    assert np.array_equal(after[before != acted[:, None]], before[before != acted[:, None]])
    # the same seeds corrupt the same clips; the input is left as it was
    again = inject_label_noise(train, LabelNoiseConfig(rate=rate, kind=kind), seed)
    assert np.array_equal(again.votes, noisy.votes) and not train.flags[NOISY].any()  # split_run's, at rate 0


def test_only_training_actors_are_corrupted_and_evaluation_stays_clean(small_clips, parts):
    config = small_config("data.label_noise.rate=0.4")
    _, noisy = split_run(small_clips, config.data, config.seed)
    flag = noisy["train"].flags[NOISY]
    assert flag.mean() == pytest.approx(0.4, abs=1 / len(flag))
    for name in ("val", "test", "test_eval", "test_adapt"):
        assert np.array_equal(noisy[name].votes, parts[name].votes) and NOISY not in noisy[name].flags
        assert np.array_equal(evaluation_labels(noisy[name], "intended"), evaluation_labels(parts[name], "intended"))
    # the noise changes what the annotators' majority says about the corrupted training clips: never the acted class
    majority = noisy["train"].votes.argmax(axis=1)
    assert not np.any(majority[flag] == parts["train"].intended[flag])
    assert (majority[~flag] == parts["train"].intended[~flag]).mean() > 0.6
    # another run seed splits (and corrupts) differently; another noise seed corrupts other clips
    other = small_config("data.label_noise.rate=0.4", "data.label_noise.seed=1")
    assert not np.array_equal(split_run(small_clips, other.data, other.seed)[1]["train"].flags[NOISY], flag)


def test_training_clients_train_on_the_noisy_labels(small_clips):
    fast = ["federation.rounds=1", "federation.adaptation=false"]
    clean = prepare_federation(small_config(*fast), small_clips)
    noisy = prepare_federation(small_config(*fast, "data.label_noise.rate=0.5", "data.label_noise.kind=uniform"),
                               small_clips)
    changed = sum(not torch.equal(noisy.clients[TRAINING][a].targets, clean.clients[TRAINING][a].targets)
                  for a in clean.clients[TRAINING])
    assert changed == len(clean.clients[TRAINING])  # at half the clips corrupted, every client has some


def test_flags_follow_every_subset_and_a_misshapen_flag_is_refused(parts):
    noisy = inject_label_noise(parts["train"], LabelNoiseConfig(rate=0.5), 0)
    actor = noisy.actor_list()[0]
    mine = noisy.for_actors([actor])
    assert np.array_equal(mine.flags[NOISY], noisy.flags[NOISY][noisy.actor_ids == actor])
    for bad in (noisy.flags[NOISY][:-1], noisy.flags[NOISY].astype(int)):
        with pytest.raises(DataError, match="flag 'label_noise' must be a boolean array"):
            dataclasses.replace(noisy, flags={NOISY: bad})


def test_a_rate_above_the_eligible_clips_is_refused_with_the_most_it_may_be(parts):
    train = parts["train"]
    with pytest.raises(ConfigError, match=r"data.label_noise.rate = 0.9 asks for \d+ corrupted .* at most 0\.\d+"):
        inject_label_noise(train, LabelNoiseConfig(rate=0.9), 0)


def test_bad_noise_settings_name_the_field():
    with pytest.raises(ConfigError, match="data.label_noise.rate"):
        small_config("data.label_noise.rate=0.95")
    with pytest.raises(ConfigError, match="data.label_noise.kind"):
        small_config("data.label_noise.kind=flip")
    with pytest.raises(ConfigError, match="data.synthetic.hard_fraction"):
        small_config("data.synthetic.hard_fraction=1.5")


def test_hard_clips_are_weak_or_blended_with_a_short_apex(small_clips):
    hard_clips = generate_synthetic(small_config("data.synthetic.hard_fraction=0.4").data)
    hard = hard_clips.flags["hard"]
    expressive = small_clips.intended != 4  # neutral shows nothing to weaken
    assert not np.any(small_clips.flags["hard"]) and not np.any(hard[~expressive])
    assert hard.sum() == round(0.4 * expressive.sum())
    # only the hard clips' frames change; their acted labels stay right
    assert np.array_equal(hard_clips.features[~hard], small_clips.features[~hard])
    assert not np.any([np.array_equal(a, b) for a, b in zip(hard_clips.features[hard], small_clips.features[hard])])
    assert np.array_equal(hard_clips.intended, small_clips.intended)
    # annotators judge what is displayed: the same clips, made hard, get the acted class's majority less often
    def majority_right(clips):
        return (clips.votes[hard].argmax(axis=1) == clips.intended[hard]).mean()
    assert majority_right(hard_clips) < majority_right(small_clips) - 0.2
    # and the apex (the frames labelled with the acted class) is short
    def apex_frames(clips):
        return (clips.frame_labels[hard] == clips.intended[hard][:, None]).sum(axis=1).mean()
    assert apex_frames(hard_clips) < 0.6 * apex_frames(small_clips)


def test_real_data_a_package_ships_gets_the_same_noise():
    pytest.importorskip("sklearn", reason="the foreign data extra (pip install -e '.[foreign]') is not installed")
    from privfer.data import load_clips
    config = small_config("data.source=digits", "data.frames=8", "data.feature_dim=8", "data.label_noise.rate=0.2",
                          "data.label_noise.kind=uniform", "data.split.val_actors=12", "data.split.test_actors=12")
    clips = load_clips(config.data)
    parts = split_run(clips, config.data, config.seed)[1]
    train, flag = parts["train"], parts["train"].flags[NOISY]
    assert flag.sum() == round(0.2 * len(train))
    # digits have one vote per clip: a corrupted clip's one vote is for the wrong class, and only there
    assert np.all(train.votes[flag].argmax(axis=1) == train.intended[flag])
    clean = clips.for_actors(train.actor_list())
    assert not np.any(train.intended[flag] == clean.intended[flag])
    assert np.array_equal(train.intended[~flag], clean.intended[~flag])
