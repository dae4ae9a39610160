"""A federated client: one person's clips, local VFER training (DP-SGD with Opacus when private), the update.

Each round the client receives the shared parameters, combines them with the
parameters it keeps (FedPer's personal layers), trains locally with a fresh
Adam optimizer, and returns the change of the shared parameters (its update,
which only leaves the client through secure aggregation) and the new values
of its personal ones (which never leave it). With DP on, training runs
through Opacus with this client's own accountant history, so epsilon composes
over every round it trains in.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from privfer.config import PrivferConfig
from privfer.fl.dpsgd import make_private_training
from privfer.models.loss import TrainingObjective
from privfer.models.vfer import VFER

History = list[tuple[float, float, int]]


@dataclass
class LocalUpdate:
    """What a client produces in one round."""

    client: int
    delta: dict[str, torch.Tensor]  # shared parameters: trained minus received
    personal: dict[str, torch.Tensor]  # parameters kept on the client, after training
    examples: int  # records the client holds (FedAvg's weight)
    loss: float  # mean training loss over the local steps
    steps: int
    history: History = field(default_factory=list)  # the accountant's history after this round (DP only)


@dataclass
class LocalTraining:
    """How a client trains in one round."""

    lr: float
    epochs: int
    batch_size: int
    noise_multiplier: float | None  # None: no DP
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    noise_source: str = "run_key"
    weight_decay: float = 0.0
    optimizer: str = "adam"  # or "sgd"
    # the strategy's operator on every trained parameter after each optimizer step (Strategy.local_step)
    local_step: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None
    # what the client minimises (Strategy.objective): the label term, the strategy's terms, the clips' weights
    objective: TrainingObjective = field(default_factory=TrainingObjective)


class FLClient:
    """One client (one actor) holding its features (N, T, D), training targets and (optionally) one weight in
    [0, 1] per clip, which the training objective multiplies each clip's loss by."""

    def __init__(self, client_id: int, features: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor,
                 weights: np.ndarray | torch.Tensor | None = None) -> None:
        if len(features) != len(targets):
            raise ValueError(f"client {client_id}: {len(features)} clips but {len(targets)} targets")
        if len(features) == 0:
            raise ValueError(f"client {client_id} holds no clips")
        self.client_id = int(client_id)
        self.features = _tensor(features, as_float=True)
        self.targets = _tensor(targets, as_float=False)
        self.weights = None if weights is None else _tensor(weights, as_float=True)
        if self.weights is not None and self.weights.shape != (len(features),):
            raise ValueError(f"client {client_id}: {len(features)} clips but weights of shape "
                             f"{tuple(self.weights.shape)}")

    @property
    def records(self) -> int:
        return len(self.features)

    def with_targets(self, targets: torch.Tensor, weights: torch.Tensor | None) -> "FLClient":
        """The same clips with other targets and weights (a strategy's refined labels); the features are shared."""
        return FLClient(self.client_id, self.features, targets, weights)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(features, targets) or (features, targets, weights): a dataset's columns."""
        return (self.features, self.targets) if self.weights is None else (self.features, self.targets, self.weights)

    def fit(
        self,
        config: PrivferConfig,
        state: dict[str, torch.Tensor],
        shared: list[str],
        plan: LocalTraining,
        *,
        history: History | None = None,
        seed: int = 0,
        before_step: Callable[[torch.nn.Module], None] | None = None,
    ) -> LocalUpdate:
        """Train from ``state`` (shared + personal parameters) and return the update of ``shared``.

        ``before_step(model)`` runs after each backward pass and before the
        optimizer step (with DP: ``p.grad`` holds the clipped sum, before
        noise) — the privacy audit inserts its gradient canaries there.
        """
        torch.manual_seed(seed)  # Poisson sampling, DP noise (noise_source run_seed), dropout, shuffling
        private = plan.noise_multiplier is not None
        model = VFER.from_config(config.model, self.features.shape[-1], private=private)
        model.load_state_dict(state)
        model.train()
        if plan.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=plan.lr,
                                                               weight_decay=plan.weight_decay)
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
        loader = DataLoader(
            TensorDataset(*self.tensors()),
            batch_size=plan.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        criterion: torch.nn.Module = plan.objective
        module: torch.nn.Module = model
        training = None
        if private:
            training = make_private_training(
                model,
                optimizer,
                loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.max_grad_norm,
                accountant=plan.accountant,
                history=history,
                noise_source=plan.noise_source,
                criterion=plan.objective,
            )
            module, optimizer, criterion, loader = training.module, training.optimizer, training.criterion, training.loader
        total, steps = 0.0, 0
        with warnings.catch_warnings():
            # Opacus hooks the first layer, whose input (the data) needs no gradient: expected, harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(plan.epochs):
                for x, *targets in loader:  # (targets) or (targets, weights)
                    optimizer.zero_grad(set_to_none=True)
                    loss = criterion(module(x), *targets)
                    loss.backward()
                    if before_step is not None:
                        before_step(model)
                    optimizer.step()  # an empty Poisson batch still takes a (noise-only) step
                    if plan.local_step is not None:
                        with torch.no_grad():
                            for name, parameter in model.named_parameters():
                                parameter.copy_(plan.local_step(parameter, state[name], plan.lr))
                    if len(x):  # (its loss is NaN)
                        total += float(loss.item()) * len(x)
                    steps += 1
        trained = {name: value.detach().clone() for name, value in model.state_dict().items()}
        return LocalUpdate(
            client=self.client_id,
            delta={name: trained[name] - state[name] for name in shared},
            personal={name: value for name, value in trained.items() if name not in shared},
            examples=self.records,
            loss=total / max(self.records * plan.epochs, 1),
            steps=steps,
            history=training.history if training is not None else [],
        )


def _tensor(values: np.ndarray | torch.Tensor, *, as_float: bool) -> torch.Tensor:
    """A tensor of ``values`` (float32 when ``as_float``); a tensor already is one (no copy when it needs none)."""
    if isinstance(values, torch.Tensor):
        return values.to(torch.float32) if as_float else values
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32 if as_float else None))


__all__ = ["FLClient", "LocalTraining", "LocalUpdate"]
