"""What a federated strategy is: which parameters are shared, how a client trains, how the sum is applied.

A strategy is a small class behind one interface (as in Flower), one file
under :mod:`privfer.fl.strategies`, registered there by one line:

* what is shared and what stays personal (:meth:`Strategy.personal_names`);
* what a client's local training adds to the optimizer's steps
  (:meth:`Strategy.local_step`: FedProx's proximal operator), and whether the
  strategy means anything without local steps (:attr:`Strategy.needs_local_steps`);
* what a client trains on and minimises: its targets and a weight per clip
  each round (:meth:`Strategy.client_data`, from the model it received and the
  per-client state it keeps, which stays on the client and is checkpointed),
  and the per-clip terms it adds to the training objective
  (:meth:`Strategy.objective_terms`) — every trainer (local, Opacus, stacked,
  distributed clipped sums) minimises the same
  :class:`~privfer.models.loss.TrainingObjective`;
* its own options (``federation.strategy_options``, validated by its
  :attr:`Strategy.Options` model) — the config knows only the names;
* how the server applies a weighted sum, how a newcomer starts, how a client
  is evaluated.

The server only ever sees the secure sum of ``weight x update`` and of the
weights (the example counts are summed as a masked coordinate too). How the
shared part is made private is the mechanism's business
(:mod:`privfer.fl.mechanisms`); what is shared, how a newcomer starts and how
a client is evaluated is the strategy's.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from privfer.config import FederationConfig
from privfer.data.clips import NUM_CLASSES
from privfer.fl.rounds import TRAINING
from privfer.models.loss import PerClipTerm, TrainingObjective
from privfer.models.vfer import VFER

# (parameter after an optimizer step, the value the client received, the step size) -> the parameter's new value
LocalStep = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, momentum: float) -> torch.optim.Optimizer:
    """The server's (or a client's personal-layer) optimizer: Adam, or SGD with momentum."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}")


def optimizer_step(
    model: VFER,
    names: list[str],
    gradients: Mapping[str, torch.Tensor],
    kind: str,
    lr: float,
    momentum: float,
    state: dict | None,
) -> dict:
    """One optimizer step on ``model``'s parameters ``names`` with the given gradients; returns the new state."""
    params = dict(model.named_parameters())
    chosen = [params[name] for name in names]
    optimizer = make_optimizer(kind, chosen, lr, momentum)
    if state is not None:
        optimizer.load_state_dict(state)
    for name, parameter in zip(names, chosen):
        parameter.grad = gradients[name].to(parameter.dtype).reshape(parameter.shape)
    optimizer.step()
    return optimizer.state_dict()


@dataclass
class ClientData:
    """What a client trains on in one round (:meth:`Strategy.client_data`): a target per clip (a vote distribution
    or a class, as the client's own) and a weight in [0, 1] per clip (None: every clip counts fully)."""

    targets: torch.Tensor
    weights: torch.Tensor | None = None


class NoOptions(BaseModel):
    """A strategy without options of its own."""

    model_config = ConfigDict(extra="forbid")


class Strategy(ABC):
    """The interface a federated algorithm implements."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # in sentences
    Options: ClassVar[type[BaseModel]] = NoOptions  # federation.strategy_options, validated
    # True: the strategy changes how clients train locally, so a mechanism that takes no local steps (record-level
    # distributed DP-SGD: one step on the global model per round) cannot run it
    needs_local_steps: ClassVar[bool] = False
    # True: a clip's target or weight depends on the client's OTHER clips (label propagation over a graph of its
    # clips). Record-level DP bounds a record's influence only through its own clipped gradient, so such a strategy
    # is refused there; it runs at person level (the whole update is clipped) and without DP.
    couples_records: ClassVar[bool] = False
    federation: FederationConfig | None = None  # set by make_strategy: the server optimizer's settings

    @classmethod
    def from_config(cls, config: FederationConfig, options: Any) -> "Strategy":
        """The strategy from the federation config and its validated options."""
        return cls()

    @abstractmethod
    def personal_names(self, model: VFER) -> list[str]:
        """Parameters that never leave the client."""

    def local_step(self) -> LocalStep | None:
        """An operator applied to every trained parameter after each local optimizer step (None: nothing)."""
        return None

    def objective_terms(self) -> Sequence[tuple[str, float, PerClipTerm]]:
        """Per-clip terms added to the label term in the training phase: ``(name, coefficient, term(logits,
        targets) -> one loss per clip)``. A term sees one clip only (per-example clipping needs it)."""
        return ()

    def objective(self, phase: str) -> TrainingObjective:
        """What clients minimise in ``phase``: the label term plus :meth:`objective_terms` in training;
        adaptation fine-tunes on pseudo labels with the label term alone, as the seed paper does."""
        return TrainingObjective(terms=self.objective_terms() if phase == TRAINING else ())

    @property
    def gives_client_data(self) -> bool:
        """Whether this strategy overrides :meth:`client_data` (otherwise clients train on their own labels)."""
        return type(self).client_data is not Strategy.client_data

    def client_data(self, phase: str, client_id: int, features: torch.Tensor, targets: torch.Tensor,
                    model: Callable[[], VFER], state: Any, *, round_index: int = 0) -> tuple[ClientData | None, Any]:
        """What client ``client_id`` trains on this round, and its new per-client state.

        Runs on the client, before it trains: ``features`` and ``targets`` are
        copies of its own clips and labels (pseudo labels in adaptation), ``model()``
        builds the model it received (shared plus its personal parameters),
        ``state`` is what this method returned for the client last time (None
        at first), ``round_index`` the number of rounds of the phase before this
        one (0 first; the round's messages carry round_index + 1, so a deployed
        client knows it). The state never leaves the client; the simulation
        keeps it in the run's checkpoint, so it must be made of tensors,
        numbers, strings, lists and dicts. Returns None for the client's own
        targets, unweighted (the default)."""
        return None, state

    def check_client(self, records: int) -> None:
        """Refuse (ValueError, saying why) a training client of ``records`` clips this strategy cannot serve within
        bounded work; called for every training client (a deployment node: its own) when the federation is prepared,
        before anything runs. Default: any."""

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

    def server_optimizer(self, phase: str) -> tuple[str, float, float]:
        """The server's optimizer under distributed DP in ``phase``: its kind, step size and momentum
        (federation.server_optimizer, server_lr or adaptation_lr, server_momentum)."""
        fed = self.federation
        if fed is None:
            raise ValueError("this strategy was not made by make_strategy: it has no federation settings")
        return fed.server_optimizer, (fed.server_lr if phase == TRAINING else fed.adaptation_lr), fed.server_momentum

    def server_step(self, gradient: np.ndarray, global_state: dict[str, torch.Tensor], template: VFER,
                    shared: list[str], phase: str, server_state: dict | None) -> tuple[dict[str, torch.Tensor], dict]:
        """How the server applies a released sum under distributed DP: one step of its optimizer
        (:meth:`server_optimizer`) on the shared parameters against a flat gradient in ``shared``'s order (the
        decoded noisy mean gradient, or the negated mean update at person level). Returns the new global state and
        the optimizer's state (checkpointed with the run). Post-processing of the release. Under local DP and
        without DP the server adds the weighted mean instead (:meth:`apply`)."""
        gradients, at = {}, 0
        for name in shared:
            size = global_state[name].numel()
            gradients[name] = torch.from_numpy(gradient[at : at + size])
            at += size
        if at != gradient.size:
            raise ValueError(f"the released sum has {gradient.size} coordinates, the shared parameters {at}")
        template.load_state_dict(global_state)
        kind, lr, momentum = self.server_optimizer(phase)
        new_server_state = optimizer_step(template, shared, gradients, kind, lr, momentum, server_state)
        new_state = {name: value.detach().clone() for name, value in template.state_dict().items()}
        for name in global_state:
            if name not in shared:
                new_state[name] = global_state[name]
        return new_state, new_server_state

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


MAX_STATE_DEPTH = 8


def checked_client_data(strategy: Strategy, client_id: int, records: int, targets: torch.Tensor,
                        data: ClientData | None) -> ClientData | None:
    """``data`` from ``strategy.client_data``, verified before any trainer uses it: a target per clip of the
    client's target type and shape, finite; a finite weight in [0, 1] per clip. ValueError naming the strategy
    otherwise."""
    if data is None:
        return None
    where = f"strategy {strategy.name!r}, client {client_id}"
    if not isinstance(data, ClientData):
        raise ValueError(f"{where}: client_data must return a ClientData or None, not {type(data).__name__}")
    new = data.targets
    if not isinstance(new, torch.Tensor) or new.shape != targets.shape or new.dtype != targets.dtype \
            or new.device != targets.device:
        raise ValueError(f"{where}: targets must keep the client's shape {tuple(targets.shape)} and dtype "
                         f"{targets.dtype}")
    if new.dtype.is_floating_point:
        if not bool(torch.isfinite(new).all()) or bool((new < 0).any()) or \
                not torch.allclose(new.sum(dim=-1), torch.ones(len(new), dtype=new.dtype), atol=1e-4):
            raise ValueError(f"{where}: every target must be a probability distribution over the classes")
    elif len(new) and (int(new.min()) < 0 or int(new.max()) >= NUM_CLASSES):
        raise ValueError(f"{where}: every target must be a class index")
    weights = data.weights
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.shape != (records,) or weights.is_complex() \
                or weights.device != targets.device:
            raise ValueError(f"{where}: weights must be a real tensor with one entry per clip ({records})")
        weights = weights.detach().to(torch.float32).clone()  # the strategy keeps no handle on what trains
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or bool((weights > 1).any()):
            raise ValueError(f"{where}: every weight must be in [0, 1]")
    return ClientData(new.detach().clone(), weights)


def check_portable(value: Any, where: str, depth: int = 0) -> None:
    """Refuse a per-client state the checkpoint could not load back (it loads with ``weights_only``): tensors,
    numbers, strings, None, lists, tuples and dicts with string or integer keys, nested at most
    :data:`MAX_STATE_DEPTH` deep — these exact types, not subclasses (numpy scalars, enums, named tuples and
    defaultdicts are what ``weights_only`` refuses)."""
    if depth > MAX_STATE_DEPTH:
        raise ValueError(f"{where}: the strategy's client state is nested more than {MAX_STATE_DEPTH} deep")
    kind = type(value)
    if value is None or kind in (bool, int, float, str) or kind is torch.Tensor:
        return
    if kind in (list, tuple):
        for item in value:
            check_portable(item, where, depth + 1)
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) not in (str, int):
                raise ValueError(f"{where}: the strategy's client state has a {type(key).__name__} key")
            check_portable(item, where, depth + 1)
        return
    raise ValueError(f"{where}: the strategy's client state holds a {type(value).__name__}, which a checkpoint "
                     "cannot keep (use tensors, numbers, strings, lists and dicts)")


def check_client_data_signature(strategy: Strategy) -> None:
    """Refuse a :meth:`Strategy.client_data` that cannot take the ``round_index`` keyword the simulation passes (one
    written before it was added), when the federation is prepared instead of at its first round."""
    if not strategy.gives_client_data:
        return
    parameters = inspect.signature(strategy.client_data).parameters
    if "round_index" not in parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        raise ValueError(f"strategy {strategy.name!r}: client_data must take the keyword argument round_index (the "
                         "round of the phase, 0 first)")


def check_per_clip(strategy: Strategy, phase: str) -> None:
    """Refuse an objective whose terms are not per clip: on random logits and targets, each clip's loss in a batch
    must equal its loss alone (a term built from batch statistics couples the clips of a batch, which per-example
    clipping and the stacked trainer cannot bound). A check of the common mistake, not a proof."""
    objective = strategy.objective(phase)
    if not objective.terms:
        return
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, NUM_CLASSES, generator=generator, dtype=torch.float64)
    votes = torch.softmax(torch.randn(6, NUM_CLASSES, generator=generator, dtype=torch.float64), -1)
    classes = torch.randint(0, NUM_CLASSES, (6,), generator=generator)
    for targets in (votes, classes):
        together = objective.per_clip(logits, targets)
        alone = torch.cat([objective.per_clip(logits[i:i + 1], targets[i:i + 1]) for i in range(len(logits))])
        if together.shape != alone.shape or not torch.allclose(together, alone, rtol=1e-9, atol=1e-12):
            names = ", ".join(name for name, _, _ in objective.terms)
            raise ValueError(f"strategy {strategy.name!r}: its objective terms ({names}) are not per clip: a clip's "
                             "loss in a batch differs from its loss alone (a term must see one clip only)")


__all__ = ["ClientData", "LocalStep", "NoOptions", "Strategy", "check_per_clip", "check_portable",
           "check_client_data_signature", "checked_client_data", "make_optimizer", "optimizer_step"]
