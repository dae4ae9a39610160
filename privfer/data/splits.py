"""Actor-disjoint train / validation / test splits with balanced gender.

The seed paper splits CREMA-D's 91 actors 67 / 12 / 12 with balanced gender
and halves each test actor's clips into an adaptation half (used for federated
adaptation) and an evaluation half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privfer.config import DataConfig, SplitConfig
from privfer.data.clips import ClipSet
from privfer.data.label_noise import inject_label_noise
from privfer.errors import ConfigError


@dataclass(frozen=True)
class ActorSplit:
    """Which actors are in which split, and which test clips adapt vs. evaluate."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]
    adaptation_clips: tuple[str, ...]
    evaluation_clips: tuple[str, ...]

    def to_dict(self) -> dict[str, list]:
        return {
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
            "adaptation_clips": list(self.adaptation_clips),
            "evaluation_clips": list(self.evaluation_clips),
        }


def _take_balanced(rng: np.random.Generator, pools: dict[str, list[int]], count: int, what: str) -> list[int]:
    """Draw ``count`` actors, half from each sex (the odd one from the larger pool)."""
    sexes = sorted(pools, key=lambda s: (-len(pools[s]), s))
    if len(sexes) == 1:
        sexes.append("")
        pools[""] = []
    larger, smaller = sexes[0], sexes[1]
    want = {smaller: count // 2, larger: count - count // 2}
    chosen: list[int] = []
    for sex, k in want.items():
        if len(pools[sex]) < k:
            raise ConfigError(
                f"data.split.{what} = {count} needs {k} {sex or 'other'} actors for balanced gender, "
                f"only {len(pools[sex])} are left"
            )
        picks = rng.choice(len(pools[sex]), k, replace=False)
        taken = [pools[sex][i] for i in sorted(picks)]
        chosen.extend(taken)
        pools[sex] = [a for a in pools[sex] if a not in set(taken)]
    return sorted(chosen)


def split_actors(clips: ClipSet, config: SplitConfig, seed: int) -> ActorSplit:
    """Seeded actor-disjoint split; every remaining actor trains."""
    n_actors = len(clips.actors)
    need = config.val_actors + config.test_actors
    if need >= n_actors:
        raise ConfigError(
            f"data.split: val_actors + test_actors = {need} leaves no training actor (the data has {n_actors})"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x53504C54]))  # namespace: "SPLT"
    pools: dict[str, list[int]] = {}
    for actor_id in clips.actor_list():
        pools.setdefault(clips.actors[actor_id].sex, []).append(actor_id)
    test = _take_balanced(rng, pools, config.test_actors, "test_actors")
    val = _take_balanced(rng, pools, config.val_actors, "val_actors")
    train = sorted(a for pool in pools.values() for a in pool)

    adaptation: list[str] = []
    evaluation: list[str] = []
    for actor_id in test:
        index = np.flatnonzero(clips.actor_ids == actor_id)
        # Halve within each emotion so both halves cover every class the actor recorded.
        for emotion in np.unique(clips.intended[index]):
            group = index[clips.intended[index] == emotion]
            group = group[rng.permutation(len(group))]
            cut = int(round(len(group) * config.adaptation_fraction))
            if len(group) >= 2:  # both halves keep at least one clip of the emotion
                cut = min(max(cut, 1), len(group) - 1)
            adaptation.extend(clips.names[group[:cut]].tolist())
            evaluation.extend(clips.names[group[cut:]].tolist())
    return ActorSplit(
        train=tuple(train),
        val=tuple(val),
        test=tuple(test),
        adaptation_clips=tuple(sorted(adaptation)),
        evaluation_clips=tuple(sorted(evaluation)),
    )


def split_clips(clips: ClipSet, split: ActorSplit) -> dict[str, ClipSet]:
    """The clip sets of a split: its actors' clips, and the test actors' evaluation and adaptation halves."""
    return {
        "train": clips.for_actors(split.train),
        "val": clips.for_actors(split.val),
        "test": clips.for_actors(split.test),
        "test_eval": clips.subset(np.isin(clips.names, np.asarray(split.evaluation_clips))),
        "test_adapt": clips.subset(np.isin(clips.names, np.asarray(split.adaptation_clips))),
    }


def split_run(clips: ClipSet, data: DataConfig, seed: int) -> tuple[ActorSplit, dict[str, ClipSet]]:
    """A run's split and its clip sets, the training actors' labels corrupted as ``data.label_noise`` asks (every
    trainer and benchmark reads its parts from here, so they all see the same noise)."""
    split = split_actors(clips, data.split, seed)
    parts = split_clips(clips, split)
    parts["train"] = inject_label_noise(parts["train"], data.label_noise, seed)
    return split, parts
