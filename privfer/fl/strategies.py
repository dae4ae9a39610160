"""Federated strategies: which parameters are shared, how updates are weighted, how the sum is applied.

A strategy is a small class behind one interface (as in Flower), so FedAvg
and FedPer differ only in what they share:

* :class:`FedAvg` (McMahan et al. 2017) shares every parameter; the server
  adds the example-weighted mean of the clients' updates.
* :class:`FedPer` (Arivazhagan et al. 2019, "personalization layers") keeps
  the last N layers (the classifier head by default) on each client; only the
  base is aggregated, and each client is evaluated with its own head.

The server only ever sees the secure sum of ``weight x update`` and of the
weights (the example counts are summed as a masked coordinate too). How the
shared part is made private is the mechanism's business
(:mod:`privfer.fl.mechanisms`); what is shared, how a newcomer starts and how
a client is evaluated is the strategy's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import numpy as np
import torch

from privfer.config import FederationConfig
from privfer.models.vfer import VFER


class Strategy(ABC):
    """The interface a federated algorithm implements."""

    name: str = ""

    @abstractmethod
    def personal_names(self, model: VFER) -> list[str]:
        """Parameters that never leave the client."""

    def shared_names(self, model: VFER) -> list[str]:
        """Parameters whose updates are securely aggregated, in the model's order."""
        personal = set(self.personal_names(model))
        return [name for name, _ in model.named_parameters() if name not in personal]

    def client_weight(self, examples: int) -> int:
        """The weight of a client's update in the mean: its example count (FedAvg's n_k)."""
        return int(examples)

    def apply(
        self, state: dict[str, torch.Tensor], weighted_sum: dict[str, torch.Tensor], total_weight: float
    ) -> dict[str, torch.Tensor]:
        """The new shared state: old + sum(w_k x update_k) / sum(w_k)."""
        if total_weight <= 0:
            raise ValueError("the aggregate covers no examples")
        new = dict(state)
        for name, summed in weighted_sum.items():
            new[name] = state[name] + (summed / total_weight).to(state[name].dtype)
        return new

    # Whether one global model serves every client, so the server side can score it (the validation actors after
    # every training round). FedPer: each client has its own head; validation actors are newcomers without one
    # until the newcomer head is aggregated at the end of phase 1.
    one_global_model: ClassVar[bool] = True

    def predict(self, features: np.ndarray, actors: np.ndarray,
                scores: Callable[[int | None, np.ndarray], np.ndarray]) -> np.ndarray:
        """Class scores for every clip: ``scores(actor, features)`` runs the model ``actor`` is evaluated with
        (None: the global model alone). FedAvg: one model for everyone."""
        return scores(None, features)

    def newcomer_head(self, heads: dict[int, dict[str, torch.Tensor]], weights: dict[int, int],
                      weighted_mean: Callable[[dict, dict], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        """The personal parameters a client without any (a newcomer) starts from; None: nothing is personal."""
        return None


class FedAvg(Strategy):
    """Share everything; weighted mean of the updates."""

    name = "fedavg"

    def personal_names(self, model: VFER) -> list[str]:
        return []


class FedPer(Strategy):
    """Keep the last ``personal_layers`` layers (the head by default) on the client; share the base."""

    name = "fedper"

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


def make_strategy(config: FederationConfig) -> Strategy:
    if config.strategy == "fedavg":
        return FedAvg()
    if config.strategy == "fedper":
        return FedPer(config.personal_layers)
    raise ValueError(f"unknown strategy {config.strategy!r}")


__all__ = ["FedAvg", "FedPer", "Strategy", "make_strategy"]
