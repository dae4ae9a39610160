from collections import Counter

import numpy as np

from privfer import EMOTIONS
from privfer.config import load_config
from privfer.data.clips import parse_clip_name
from privfer.data.summary import summarize
from privfer.data.synthetic import generate_synthetic


def small(**synthetic):
    return load_config(None, ["data.frames=6", "data.feature_dim=16", *[f"data.synthetic.{k}={v}" for k, v in synthetic.items()]]).data


def test_population_follows_cremad_by_default():
    clips = generate_synthetic(load_config(None, ["data.feature_dim=8", "data.frames=4"]).data)
    assert len(clips.actors) == 91
    assert Counter(a.sex for a in clips.actors.values()) == {"Male": 48, "Female": 43}
    assert len(clips) == 7442  # 91 x 82 minus 20 missing, as CREMA-D
    assert sorted(clips.actors) == list(range(1001, 1092))
    per_actor = Counter(clips.actor_ids.tolist())
    assert 78 <= min(per_actor.values()) and max(per_actor.values()) == 82
    levels = Counter(parse_clip_name(n)[3] for n in clips.names)
    assert set(levels) == {"LO", "MD", "HI", "XX"}
    assert clips.features.shape == (7442, 4, 8) and clips.features.dtype == np.float32
    counts = clips.votes.sum(axis=1)
    assert counts.min() >= 4 and counts.max() <= 12
    for name, intended in zip(clips.names[:50], clips.intended[:50]):
        assert parse_clip_name(name)[2] == intended


def test_deterministic_given_seed_and_different_across_seeds():
    a, b = generate_synthetic(small(seed=3)), generate_synthetic(small(seed=3))
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.votes, b.votes)
    c = generate_synthetic(small(seed=4))
    assert not np.array_equal(a.features, c.features)


def test_shape_knobs():
    clips = generate_synthetic(load_config(None, ["data.frames=5", "data.feature_dim=7", "data.synthetic.actors=6",
                                                   "data.synthetic.missing_clips=0"]).data)
    assert clips.features.shape == (6 * 82, 5, 7)
    assert clips.frame_labels.shape == (6 * 82, 5)


def test_votes_are_informative_but_not_the_acted_label():
    summary = summarize(generate_synthetic(small()))
    # CREMA-D visual-only raters named the acted emotion 58.2% of the time
    assert 0.45 < summary["rater_accuracy"] < 0.7
    assert summary["majority_accuracy"] < 0.95


def test_confusions_are_realistic():
    clips = generate_synthetic(small())
    share = lambda acted, voted: clips.votes[clips.intended == EMOTIONS.index(acted), EMOTIONS.index(voted)].sum()
    assert share("anger", "disgust") > 2 * share("anger", "happiness")
    assert share("fear", "sadness") > 2 * share("fear", "happiness")
    low = np.array([n.endswith("_LO") for n in clips.names])
    high = np.array([n.endswith("_HI") for n in clips.names])
    neutral_share = lambda mask: clips.votes[mask, EMOTIONS.index("neutral")].sum() / clips.votes[mask].sum()
    assert neutral_share(low) > neutral_share(high)  # weak displays read as neutral


def test_actors_differ_in_style():
    clips = generate_synthetic(small())
    means = np.stack([clips.features[clips.actor_ids == a].mean(axis=(0, 1)) for a in clips.actor_list()])
    within = np.mean([clips.features[clips.actor_ids == a].mean(axis=1).std(axis=0).mean() for a in clips.actor_list()])
    assert means.std(axis=0).mean() > 0.1 * within  # per-actor shifts are visible against clip variation


def test_frame_labels_mark_the_apex():
    clips = generate_synthetic(small())
    frames, labels = clips.frame_level()
    assert len(frames) == len(labels) and labels.min() >= 0
    expressive = clips.intended != EMOTIONS.index("neutral")
    marked = clips.frame_labels[expressive]
    acted = np.broadcast_to(clips.intended[expressive, None], marked.shape)
    assert np.all((marked == acted) | (marked == EMOTIONS.index("neutral")) | (marked == -1))
    assert (marked == acted).any(axis=1).mean() > 0.95  # nearly every clip reaches its apex


def _pair_accuracy(clips, pair, readout):
    """Held-out accuracy of a ridge classifier telling the two emotions of ``pair`` apart from ``readout(frames)``;
    trained on the first 40 actors, scored on the rest."""
    a, b = (EMOTIONS.index(e) for e in pair)
    keep = np.isin(clips.intended, [a, b])
    x = readout(clips.features[keep].astype(np.float64))
    x = np.c_[x, np.ones(len(x))]
    y = (clips.intended[keep] == b).astype(np.float64) * 2 - 1
    train = clips.actor_ids[keep] < 1041
    w = np.linalg.solve(x[train].T @ x[train] + np.eye(x.shape[1]), x[train].T @ y[train])
    return float(((x[~train] @ w > 0) == (y[~train] > 0)).mean())


def test_order_signal_moves_the_emotion_from_the_mean_frame_into_the_frames_order():
    """At order_signal 1, mirror-image emotions (anger / disgust, fear / sadness) show the same parts in opposite
    orders: a classifier of the mean frame is at chance, one that sees the two halves apart is not. At 0 (the
    default) the mean frame tells them apart."""
    def mean(frames):
        return frames.mean(axis=1)

    def halves(frames):
        return np.concatenate([frames[:, :8].mean(axis=1), frames[:, 8:].mean(axis=1)], axis=1)

    config = load_config(None, ["data.synthetic.actors=60"]).data
    flat = generate_synthetic(config)
    config.synthetic.order_signal = 1.0
    ordered = generate_synthetic(config)
    for pair in (("anger", "disgust"), ("fear", "sadness")):
        assert _pair_accuracy(flat, pair, mean) > 0.7
        assert _pair_accuracy(ordered, pair, mean) < 0.58
        assert _pair_accuracy(ordered, pair, halves) > 0.68
    # happiness has no mirror image: its order carries nothing the mean does not
    assert _pair_accuracy(ordered, ("anger", "happiness"), mean) > 0.65
    # the votes and the population do not depend on where the signal lives
    np.testing.assert_array_equal(flat.votes, ordered.votes)
    np.testing.assert_array_equal(flat.frame_labels, ordered.frame_labels)


def test_order_signal_zero_is_the_default_data_and_is_deterministic():
    base = small(seed=5)
    explicit = small(seed=5, order_signal=0.0)
    np.testing.assert_array_equal(generate_synthetic(base).features, generate_synthetic(explicit).features)
    half = small(seed=5, order_signal=0.5)
    a, b = generate_synthetic(half), generate_synthetic(half)
    np.testing.assert_array_equal(a.features, b.features)
    assert not np.array_equal(a.features, generate_synthetic(base).features)
