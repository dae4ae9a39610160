"""FedPer (Arivazhagan et al. 2019, "personalization layers"): the last N layers stay on each client.

Only the base is aggregated; each client is evaluated with its own head, and a
newcomer starts from the example-weighted mean of the trained clients' heads.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from privfer.config import FederationConfig
from privfer.fl.strategies.base import Strategy
from privfer.models.vfer import VFER


class FedPer(Strategy):
    """Keep the last ``personal_layers`` layers (the head by default) on the client; share the base."""

    name = "fedper"
    title = "FedPer"

    @classmethod
    def from_config(cls, config: FederationConfig, options: Any) -> "FedPer":
        return cls(config.personal_layers)

    def __init__(self, personal_layers: int = 1) -> None:
        self.personal_layers = personal_layers

    one_global_model = False

    def personal_names(self, model: VFER) -> list[str]:
        return model.personal_parameter_names(self.personal_layers)

    def predict(self, features: np.ndarray, actors: np.ndarray,
                scores: Callable[[int | None, np.ndarray], np.ndarray]) -> np.ndarray:
        """Each actor is scored with its own head (a newcomer: the newcomer head)."""
        out: np.ndarray | None = None
        for actor in np.unique(actors):
            mask = actors == actor
            part = scores(int(actor), features[mask])
            if out is None:
                out = np.zeros((len(features), *part.shape[1:]), dtype=part.dtype)
            out[mask] = part
        if out is None:
            raise ValueError("no clips to score")
        return out

    def newcomer_head(self, heads: dict[int, dict[str, torch.Tensor]], weights: dict[int, int],
                      weighted_mean: Callable[[dict, dict], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        """The example-weighted mean of the trained clients' heads (``weighted_mean`` sums them securely)."""
        if not heads:
            raise ValueError("no trained client holds a head")
        return weighted_mean(heads, weights)


__all__ = ["FedPer"]
