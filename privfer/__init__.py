"""privfer: private federated learning for video facial expression recognition."""

from __future__ import annotations

__version__ = "0.1.0"

EMOTIONS: tuple[str, ...] = ("anger", "disgust", "fear", "happiness", "neutral", "sadness")
"""The six CREMA-D classes, in the order of the vote columns A, D, F, H, N, S."""

__all__ = ["EMOTIONS", "__version__"]
