"""Shared fixtures: small synthetic populations that keep the suite fast."""

from __future__ import annotations

import pytest

from privfer.config import PrivferConfig, load_config
from privfer.data.synthetic import generate_synthetic

SMALL = [
    "data.frames=8",
    "data.feature_dim=128",
    "data.synthetic.actors=48",
    "data.synthetic.missing_clips=0",
    "data.split.val_actors=4",
    "data.split.test_actors=8",
    "model.hidden_size=32",
    "training.epochs=6",
    "training.lr=0.003",
    "training.batch_size=64",
]


def small_config(*overrides: str) -> PrivferConfig:
    """A population of 48 actors with 8 x 128 features: seconds, not minutes, to train."""
    return load_config(None, [*SMALL, *overrides])


@pytest.fixture(scope="session")
def small_clips():
    return generate_synthetic(small_config().data)
