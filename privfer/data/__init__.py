"""Data layer: clips from real CREMA-D or the synthetic generator, labels, splits."""

from __future__ import annotations

from privfer.config import DataConfig
from privfer.config.sections import FOREIGN_SHAPES
from privfer.data.clips import ClipSet
from privfer.errors import DataError


def load_clips(config: DataConfig) -> ClipSet:
    """The clips ``config`` names: the synthetic population by default, or a CREMA-D folder.

    A CREMA-D folder's features define T and D: ``config.frames`` and ``config.feature_dim``, when unset, are
    filled in from them (so a run's resolved config.yaml states them); set to other values, they are an error
    rather than silently ignored.
    """
    if config.source == "synthetic":
        from privfer.data.synthetic import generate_synthetic

        return generate_synthetic(config)
    if config.source in FOREIGN_SHAPES:
        from privfer.data.foreign import load_foreign

        return load_foreign(config.source)
    from privfer.data.cremad import load_cremad

    assert config.root is not None  # checked by DataConfig
    clips = load_cremad(config.root, votes=config.votes)
    for field, actual in (("frames", clips.frames), ("feature_dim", clips.feature_dim)):
        asked = getattr(config, field)
        if asked is not None and asked != actual:
            raise DataError(f"data.{field} = {asked}, but the features in {config.root} have {field} = {actual}; "
                            f"leave data.{field} unset (it is read from the features)")
        try:
            setattr(config, field, actual)
        except ValueError:
            raise DataError(f"the features in {config.root} have {field} = {actual}, outside what privfer "
                            f"supports (data.{field}: {type(config).model_fields[field].description})") from None
    return clips


__all__ = ["ClipSet", "load_clips"]
