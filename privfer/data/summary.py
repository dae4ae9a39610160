"""Descriptive statistics of a clip set: actors, clips, class balance, annotator agreement."""

from __future__ import annotations

from typing import Any

import numpy as np

from privfer import EMOTIONS
from privfer.data.clips import ClipSet
from privfer.data.labels import discrete_labels


def summarize(clips: ClipSet) -> dict[str, Any]:
    """Counts and agreement figures comparable with CREMA-D's published ones.

    ``rater_accuracy`` is the share of individual votes naming the acted
    emotion (CREMA-D visual-only: 58.2%); ``majority_accuracy`` the share of
    clips whose majority vote does.
    """
    sexes = [a.sex for a in clips.actors.values()]
    votes = clips.votes
    per_clip = votes.sum(axis=1)
    rater_accuracy = float(votes[np.arange(len(clips)), clips.intended].sum() / max(per_clip.sum(), 1))
    majority = discrete_labels(votes, clips.intended)
    clips_per_actor = np.bincount(np.unique(clips.actor_ids, return_inverse=True)[1])
    return {
        "source": str(clips.meta.get("source", "unknown")),
        "actors": len(clips.actors),
        "male": sexes.count("Male"),
        "female": sexes.count("Female"),
        "clips": len(clips),
        "clips_per_actor": float(clips_per_actor.mean()),
        "frames": clips.frames,
        "feature_dim": clips.feature_dim,
        "votes_per_clip_min": int(per_clip.min()),
        "votes_per_clip_max": int(per_clip.max()),
        "rater_accuracy": rater_accuracy,
        "majority_accuracy": float((majority == clips.intended).mean()),
        "classes": {
            name: {
                "clips": int((clips.intended == i).sum()),
                "vote_share": float(votes[:, i].sum() / max(votes.sum(), 1)),
            }
            for i, name in enumerate(EMOTIONS)
        },
    }
