"""FedAvg (McMahan et al., AISTATS 2017): every parameter shared; the server adds the weighted mean of the updates."""

from __future__ import annotations

from privfer.fl.strategies.base import Strategy
from privfer.models.vfer import VFER


class FedAvg(Strategy):
    """Share everything; weighted mean of the updates."""

    name = "fedavg"
    title = "FedAvg"

    def personal_names(self, model: VFER) -> list[str]:
        return []


__all__ = ["FedAvg"]
