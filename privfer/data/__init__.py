"""Data layer: clips from real CREMA-D or the synthetic generator, labels, splits."""

from __future__ import annotations

from privfer.config import DataConfig
from privfer.data.clips import ClipSet


def load_clips(config: DataConfig) -> ClipSet:
    """The clips ``config`` names: the synthetic population by default, or a CREMA-D folder."""
    if config.source == "synthetic":
        from privfer.data.synthetic import generate_synthetic

        return generate_synthetic(config)
    from privfer.data.cremad import load_cremad

    assert config.root is not None  # checked by DataConfig
    return load_cremad(config.root, votes=config.votes)


__all__ = ["ClipSet", "load_clips"]
