"""Training targets from annotator votes: partial labels, discrete labels, IFER pseudo labels.

Partial labels follow the seed paper (Daffa et al.): a softmax over the
visual-only vote counts in which classes nobody voted for are masked out, so
their probability is exactly 0 (the paper writes the mask as a large negative
number, "-10^-9" in print, meaning -1e9).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from privfer.errors import DataError

if TYPE_CHECKING:
    from privfer.data.clips import ClipSet


def _check_votes(votes: np.ndarray) -> np.ndarray:
    votes = np.asarray(votes)
    if votes.ndim != 2:
        raise DataError(f"votes must be a (clips, classes) array, got shape {votes.shape}")
    if np.any(votes < 0):
        raise DataError("votes must be non-negative counts")
    if np.any(votes.sum(axis=1) == 0):
        empty = int(np.flatnonzero(votes.sum(axis=1) == 0)[0])
        raise DataError(f"clip at row {empty} has no votes; a partial label needs at least one")
    return votes.astype(np.float64)


def partial_labels(votes: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Vote distribution per clip: softmax(counts / temperature) over voted classes only.

    Returns float32 (clips, classes); every row sums to 1 and classes with zero
    votes have probability exactly 0. (At very low temperatures a voted class
    far behind the leader can also round to 0 in float32.)
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    counts = _check_votes(votes)
    voted = counts > 0
    logits = np.where(voted, counts / temperature, -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.where(voted, np.exp(logits), 0.0)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def discrete_labels(votes: np.ndarray, intended: np.ndarray | None = None) -> np.ndarray:
    """Majority vote per clip.

    Tie rule: when several classes share the most votes, the acted (intended)
    emotion wins if it is among them; otherwise the first tied class in the
    canonical order anger, disgust, fear, happiness, neutral, sadness (CREMA-D's
    own tabulation lists such ties as "A:D" and leaves the choice open).
    """
    counts = _check_votes(votes)
    top = counts == counts.max(axis=1, keepdims=True)
    labels = top.argmax(axis=1)  # first tied class in canonical order
    if intended is not None:
        intended = np.asarray(intended)
        if intended.shape != (len(counts),):
            raise DataError(f"intended must have one entry per clip, got shape {intended.shape}")
        wins = top[np.arange(len(counts)), intended]
        labels = np.where(wins, intended, labels)
    return labels.astype(np.int64)


def pseudo_labels(frame_probabilities: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Clip labels from a frame classifier, as in the seed paper's adaptation step.

    ``frame_probabilities`` is (clips, frames, classes). A clip's distribution is
    the mean of its frames' class probabilities; it is kept only when its top
    probability exceeds ``threshold``. Returns (labels, keep_mask).
    """
    probs = np.asarray(frame_probabilities, dtype=np.float64)
    if probs.ndim != 3:
        raise ValueError(f"frame_probabilities must be (clips, frames, classes), got shape {probs.shape}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    clip_probs = probs.mean(axis=1)
    return clip_probs.argmax(axis=1).astype(np.int64), clip_probs.max(axis=1) > threshold


def training_targets(clips: ClipSet, labels: str, temperature: float = 1.0) -> np.ndarray:
    """Partial labels (float (N, 6) distributions) or discrete labels (int (N,) classes)."""
    if labels == "partial":
        return partial_labels(clips.votes, temperature)
    if labels == "discrete":
        return discrete_labels(clips.votes, clips.intended)
    raise ValueError(f"labels must be 'partial' or 'discrete', got {labels!r}")


def evaluation_labels(clips: ClipSet, eval_target: str) -> np.ndarray:
    """Ground truth for metrics: the acted emotion or the annotators' majority vote."""
    if eval_target == "intended":
        return clips.intended
    if eval_target == "majority":
        return discrete_labels(clips.votes, clips.intended)
    raise ValueError(f"eval_target must be 'intended' or 'majority', got {eval_target!r}")
