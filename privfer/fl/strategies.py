"""Federated strategies: which parameters are shared, how updates are weighted, how the sum is applied.

A strategy is a small class behind one interface (as in Flower), so FedAvg
and FedPer differ only in what they share:

* :class:`FedAvg` (McMahan et al. 2017) shares every parameter; the server
  adds the example-weighted mean of the clients' updates.
* :class:`FedPer` (Arivazhagan et al. 2019, "personalization layers") keeps
  the last N layers (the classifier head by default) on each client; only the
  base is aggregated, and each client is evaluated with its own head.

The server only ever sees the secure sum of ``weight x update`` and of the
weights (the example counts are summed as a masked coordinate too).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

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

    @property
    def personalized(self) -> bool:
        return False


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

    def personal_names(self, model: VFER) -> list[str]:
        return model.personal_parameter_names(self.personal_layers)

    @property
    def personalized(self) -> bool:
        return True


def make_strategy(config: FederationConfig) -> Strategy:
    if config.strategy == "fedavg":
        return FedAvg()
    if config.strategy == "fedper":
        return FedPer(config.personal_layers)
    raise ValueError(f"unknown strategy {config.strategy!r}")


__all__ = ["FedAvg", "FedPer", "Strategy", "make_strategy"]
