"""The clip collection every data source produces: features, votes, actors.

A :class:`ClipSet` is plain numpy arrays, one row per clip, so that the real
CREMA-D reader and the synthetic generator hand the rest of the pipeline the
same thing. It carries no torch dependency.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from privfer import EMOTIONS
from privfer.errors import DataError

EMOTION_CODES: tuple[str, ...] = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
"""CREMA-D's emotion codes in clip names, in the order of :data:`privfer.EMOTIONS`."""

VOTE_COLUMNS: tuple[str, ...] = ("A", "D", "F", "H", "N", "S")
"""Vote-count columns of ``tabulatedVotes.csv``, in the order of :data:`privfer.EMOTIONS`."""

LEVELS: tuple[str, ...] = ("LO", "MD", "HI", "XX")
"""Intensity levels in clip names; XX = unspecified."""

SENTENCES: tuple[str, ...] = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
"""CREMA-D's 12 sentences. IEO is the one spoken at three intensity levels."""

NUM_CLASSES = len(EMOTIONS)


@dataclass(frozen=True)
class Actor:
    """One person: a CREMA-D actor, and in federated runs, one client."""

    actor_id: int
    sex: str  # "Male" or "Female", as in VideoDemographics.csv
    age: int | None = None


@dataclass
class ClipSet:
    """Clips with their frame features, annotator votes and provenance.

    Attributes:
        names: clip names ``{actor}_{sentence}_{emotion}_{level}``, shape (N,).
        features: float32 frame features, shape (N, T, D).
        votes: int64 visual-only annotator vote counts per class, shape (N, 6).
        intended: int64 acted emotion index from the clip name, shape (N,).
        actor_ids: int64 actor of each clip, shape (N,).
        actors: the actors, keyed by id.
        frame_labels: optional int64 per-frame emotion (-1 = unlabeled), shape (N, T).
            The synthetic generator knows which frames show the expression; real
            CREMA-D does not, and leaves it None.
        flags: per-clip boolean markers, each shape (N,), that only the data's
            maker knows: ``hard`` (the generator's weak or blended displays),
            ``label_noise`` (training clips whose labels were corrupted). For
            studies and tests: no training code reads them.
    """

    names: np.ndarray
    features: np.ndarray
    votes: np.ndarray
    intended: np.ndarray
    actor_ids: np.ndarray
    actors: dict[int, Actor]
    frame_labels: np.ndarray | None = None
    meta: dict[str, object] = field(default_factory=dict)
    flags: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.names)
        if self.features.ndim != 3:
            raise DataError(f"features must be (clips, frames, dims), got shape {self.features.shape}")
        for label, array in (("features", self.features), ("votes", self.votes), ("intended", self.intended),
                             ("actor_ids", self.actor_ids)):
            if len(array) != n:
                raise DataError(f"{label} has {len(array)} rows but there are {n} clips")
        if self.votes.ndim != 2 or self.votes.shape[1] != NUM_CLASSES:
            raise DataError(f"votes must be (clips, {NUM_CLASSES}), got shape {self.votes.shape}")
        unknown = set(np.unique(self.actor_ids).tolist()) - set(self.actors)
        if unknown:
            raise DataError(f"clips reference actors without demographics: {sorted(unknown)[:5]}")
        if self.frame_labels is not None and self.frame_labels.shape != self.features.shape[:2]:
            raise DataError(f"frame_labels must be (clips, frames), got shape {self.frame_labels.shape}")
        for name, flag in self.flags.items():
            if flag.shape != (n,) or flag.dtype != bool:
                raise DataError(f"flag {name!r} must be a boolean array of shape ({n},), got {flag.dtype} {flag.shape}")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def frames(self) -> int:
        return int(self.features.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[2])

    def subset(self, index: np.ndarray) -> "ClipSet":
        """The clips at ``index`` (integer positions or a boolean mask)."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        ids = set(np.unique(self.actor_ids[index]).tolist())
        return ClipSet(
            names=self.names[index],
            features=self.features[index],
            votes=self.votes[index],
            intended=self.intended[index],
            actor_ids=self.actor_ids[index],
            actors={a: self.actors[a] for a in ids},
            frame_labels=None if self.frame_labels is None else self.frame_labels[index],
            meta=dict(self.meta),
            flags={name: flag[index] for name, flag in self.flags.items()},
        )

    def for_actors(self, actor_ids: list[int] | np.ndarray) -> "ClipSet":
        """The clips of the given actors."""
        return self.subset(np.isin(self.actor_ids, np.asarray(list(actor_ids))))

    def actor_list(self) -> list[int]:
        return sorted(self.actors)

    def frame_level(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame features and labels for fitting the frame classifier (IFER).

        With generator-provided frame labels, frames marked -1 (onset/offset, where
        the expression is ambiguous) are left out. Without them (real CREMA-D),
        every frame inherits its clip's acted emotion.
        """
        frames = self.features.reshape(-1, self.feature_dim)
        if self.frame_labels is not None:
            labels = self.frame_labels.reshape(-1)
        else:
            labels = np.repeat(self.intended, self.frames)
        keep = labels >= 0
        return frames[keep], labels[keep].astype(np.int64)


def parse_clip_name(name: str) -> tuple[int, str, int, str]:
    """``1001_DFA_ANG_XX`` -> (actor, sentence, emotion index, level); ValueError if malformed."""
    parts = name.split("_")
    if len(parts) != 4:
        raise ValueError(f"clip name {name!r} is not actor_sentence_emotion_level")
    actor, sentence, emotion, level = parts
    if not actor.isdigit():
        raise ValueError(f"clip name {name!r}: actor {actor!r} is not a number")
    if sentence not in SENTENCES:
        raise ValueError(f"clip name {name!r}: unknown sentence {sentence!r}")
    if emotion not in EMOTION_CODES:
        raise ValueError(f"clip name {name!r}: unknown emotion {emotion!r} (expected one of {', '.join(EMOTION_CODES)})")
    if level not in LEVELS:
        raise ValueError(f"clip name {name!r}: unknown level {level!r} (expected one of {', '.join(LEVELS)})")
    return int(actor), sentence, EMOTION_CODES.index(emotion), level


def clip_name(actor: int, sentence: str, emotion: int, level: str) -> str:
    return f"{actor}_{sentence}_{EMOTION_CODES[emotion]}_{level}"


def cremad_clip_plan() -> list[tuple[str, int, str]]:
    """The 82 (sentence, emotion, level) recordings each CREMA-D actor made.

    IEO is spoken with every non-neutral emotion at LO, MD and HI (15) plus
    neutral (XX); the other 11 sentences once per emotion at XX (66).
    """
    neutral = EMOTIONS.index("neutral")
    plan: list[tuple[str, int, str]] = []
    for sentence in SENTENCES:
        for emotion in range(NUM_CLASSES):
            if sentence == "IEO" and emotion != neutral:
                plan.extend((sentence, emotion, level) for level in ("LO", "MD", "HI"))
            else:
                plan.append((sentence, emotion, "XX"))
    return plan
