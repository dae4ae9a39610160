"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, MLSys 2020): local training with a proximal term.

Each client approximately minimizes, from the global model w^t it received,

    h_k(w; w^t) = F_k(w) + (mu / 2) ||w - w^t||^2,

so that heterogeneous clients' local steps cannot drift far from w^t
(Algorithm 2 of the paper); mu = 0 is FedAvg. privfer applies the proximal
term by its exact proximal operator after each local optimizer step
(forward-backward splitting): the step w' on F_k is followed by

    w <- argmin_w (1 / (2 lr)) ||w - w'||^2 + (mu / 2) ||w - w^t||^2 = (w' + lr mu w^t) / (1 + lr mu),

which pulls every parameter toward the received value by the factor
1 / (1 + lr mu) of its distance. With SGD this is proximal gradient descent on
h_k, which has the same minimizers as gradient descent on it; with Adam the
pull is decoupled from the adaptive step, as AdamW treats weight decay. Under
local DP-SGD the operator acts on what the DP optimizer produced and on the
public w^t, so it is post-processing: the accounting does not change. The
server's side is FedAvg's (every parameter shared, the weighted mean).

FedProx acts on local steps: record-level distributed DP-SGD takes none (one
step on the global model per round), so the federation refuses it there.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from privfer.config import FederationConfig
from privfer.fl.strategies.base import LocalStep
from privfer.fl.strategies.fedavg import FedAvg


class FedProxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mu: float = Field(0.01, ge=0.0, le=1e4, description="The proximal term's weight (the paper's mu; 0 is FedAvg).")


class FedProx(FedAvg):
    """FedAvg's sharing with the proximal term in each client's local training."""

    name = "fedprox"
    title = "FedProx"
    Options = FedProxOptions
    needs_local_steps = True

    def __init__(self, mu: float = 0.01) -> None:
        if not 0 <= mu <= 1e4:
            raise ValueError(f"mu must be in [0, 10000], got {mu!r}")
        self.mu = float(mu)

    @classmethod
    def from_config(cls, config: FederationConfig, options: Any) -> "FedProx":
        return cls(options.mu)

    def local_step(self) -> LocalStep | None:
        mu = self.mu

        def proximal(parameter: torch.Tensor, received: torch.Tensor, lr: float) -> torch.Tensor:
            return (parameter + (lr * mu) * received) / (1 + lr * mu)

        return proximal if mu > 0 else None


__all__ = ["FedProx"]
