"""Label noise injected into the training actors' clips: a test bed for the label-noise methods (issue 27).

A chosen share of the training clips gets annotators who systematically vote
for another class where they would have voted for the acted one: the clip's
vote counts for its acted class and for a wrong class are swapped, so the
wrong class gets the acted class's lead. Only clips with more votes for the
acted class than for the wrong one are eligible (a swap of equal counts would
change no vote; a rate asking for more clips than are eligible is refused
with the most it may be). Every
other label the training side reads names the wrong class too: the clip's
``intended`` (discrete labels break ties with it, and the IFER falls back on
it without frame labels) and its frame labels that showed the acted class
(the synthetic generator's; they fit the IFER when no public one is given).
Its features still show the acted expression. The wrong class is, per
``kind``:

* ``pair`` (asymmetric noise, the default): the acted class's partner in
  :data:`PAIRS` — anger and disgust, fear and sadness, happiness and neutral,
  each the other's — the confusions raters make most (CREMA-D's visual-only
  confusions; the synthetic generator's prototype similarities);
* ``uniform`` (symmetric noise): one of the other five classes, uniformly.

Exactly ``round(rate x training clips)`` clips are corrupted, drawn uniformly
without replacement from the eligible ones, from a stream keyed by the run seed and
``data.label_noise.seed`` (the split depends on the run seed, so the noisy
clips do too). Only training clips are touched: validation and test actors
keep their labels, and evaluation scores the acted emotion (or the majority
vote) of clean test actors. Any data source works: the synthetic generator,
CREMA-D, and the packages' data sets (digits, watch).
"""

from __future__ import annotations

import math

import numpy as np

from privfer.config import LabelNoiseConfig
from privfer.data.clips import NUM_CLASSES, ClipSet
from privfer.errors import ConfigError

# each class's partner under pair noise (an involution over the canonical order anger, disgust, fear, happiness,
# neutral, sadness): anger <-> disgust, fear <-> sadness, happiness <-> neutral
PAIRS = np.array([1, 0, 5, 4, 3, 2])
NOISY = "label_noise"  # the ClipSet.flags key marking the corrupted clips
_NAMESPACE = 0x4C4E4F49  # "LNOI": a stream apart from every other seeded one


def noise_targets(intended: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The wrong class each clip's annotators vote for instead of ``intended``."""
    intended = np.asarray(intended, dtype=np.int64)
    if kind == "pair":
        return PAIRS[intended]
    if kind == "uniform":  # one of the other NUM_CLASSES - 1 classes, uniformly
        shift = rng.integers(1, NUM_CLASSES, len(intended))
        return (intended + shift) % NUM_CLASSES
    raise ValueError(f"label noise kind must be 'pair' or 'uniform', got {kind!r}")


def inject_label_noise(train: ClipSet, config: LabelNoiseConfig, seed: int) -> ClipSet:
    """``train`` with ``config.rate`` of its clips' labels corrupted (a copy; ``train`` is left as it was).

    The result's ``flags[NOISY]`` marks the corrupted clips (all False at rate 0), for studies and tests: no training
    code reads it.
    """
    n = len(train)
    count = int(round(config.rate * n))
    noisy = np.zeros(n, dtype=bool)
    votes, intended, frame_labels = train.votes, train.intended, train.frame_labels
    if count:
        rng = np.random.default_rng(np.random.SeedSequence([seed, config.seed, _NAMESPACE]))
        everyone = np.arange(n)
        wrong_of = noise_targets(train.intended, config.kind, rng)  # each clip's wrong class, drawn for all
        # only a clip whose annotators preferred its acted class to its wrong one can have that preference reversed
        # (with equal counts the swap would change no vote)
        eligible = np.flatnonzero(train.votes[everyone, train.intended] > train.votes[everyone, wrong_of])
        if count > len(eligible):
            raise ConfigError(
                f"data.label_noise.rate = {config.rate:g} asks for {count} corrupted training clips, but only "
                f"{len(eligible)} of the {n} have more votes for their acted class than for its wrong one; allowed "
                f"here: at most {math.floor(100 * len(eligible) / n) / 100:g}")
        rows = np.sort(rng.choice(eligible, count, replace=False))
        noisy[rows] = True
        acted, wrong = train.intended[rows], wrong_of[rows]
        votes = train.votes.copy()
        votes[rows, acted], votes[rows, wrong] = train.votes[rows, wrong], train.votes[rows, acted]
        intended = train.intended.copy()
        intended[rows] = wrong
        if frame_labels is not None:  # the frames that showed the acted class are labelled with the wrong one
            frame_labels = frame_labels.copy()
            frame_labels[rows] = np.where(frame_labels[rows] == acted[:, None], wrong[:, None], frame_labels[rows])
    # the features are shared, not copied (the largest array; nothing here writes to it)
    return ClipSet(names=train.names, features=train.features, votes=votes, intended=intended,
                   actor_ids=train.actor_ids, actors=dict(train.actors), frame_labels=frame_labels,
                   meta=dict(train.meta), flags={**train.flags, NOISY: noisy})
