"""Local training of many clients at once: each client's own steps, stacked along a client axis.

A person-level round at population scale trains thousands of small VFERs one
after the other; each step is a few tiny matrix products, so the time goes to
Python and autograd overhead, not arithmetic (8.4 ms per client for the
population study's model, 1.1 ms stacked: benchmarks/population.py). Here every parameter gets a leading client axis,
the model's stacked forward (:meth:`privfer.models.vfer.VFER.stacked_forward`, the LSTM unrolled with batched
matrix products) runs them all, and one backward pass
yields every client's own gradient: the loss is the SUM over clients of each
client's mean loss on its own batch, and no parameter is shared between
clients, so client j's gradient is exactly the gradient of its own loss.
Adam (or SGD) is elementwise, so one optimizer over the stacked tensors is K
independent optimizers; a per-client step mask freezes a client that has run
out of batches (its moments and step count do not move), and the bias
correction uses each client's own step count.

The batches are the ones :meth:`privfer.fl.client.FLClient.fit` draws (a
shuffled DataLoader of the same length and batch size, with a generator
seeded by the client's seed). The result matches ``fit`` client by client up to
floating-point rounding (tests/test_batched_training.py); models it cannot
reproduce exactly (dropout, the fast DP-SGD layer, a per-step hook, DP-SGD)
are refused by :func:`batchable`, and callers train those one by one.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import DataLoader, TensorDataset

from privfer.config import PrivferConfig
from privfer.fl.client import FLClient, LocalTraining, LocalUpdate
from privfer.models.vfer import VFER

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which FLClient.fit uses
ADAM_EPS = 1e-8
MAX_CHUNK_VALUES = 1 << 26  # float32 values a chunk keeps (256 MiB): padded features and one batch's activations


def batchable(config: PrivferConfig, plan: LocalTraining) -> str | None:
    """None when :func:`fit_clients` reproduces ``FLClient.fit`` for this config and plan; else why not."""
    if plan.noise_multiplier is not None:
        return "local DP-SGD (Opacus) trains per client"
    if config.model.dropout > 0:
        return "dropout draws per-client random masks"
    if config.model.architecture == "dual_stream":
        return "the dual-stream model"
    if config.model.recurrent == "fast_dp":
        return "the fast DP-SGD recurrent layer"
    return None


def _per_clip_loss(plan: LocalTraining, logits: torch.Tensor, targets: torch.Tensor,
                   weights: torch.Tensor | None) -> torch.Tensor:
    """(K, B, classes) logits -> (K, B) losses: the plan's objective per clip, the loss ``fit`` trains with."""
    flat_weights = None if weights is None else weights.flatten(0, 1)
    return plan.objective.per_clip(logits.flatten(0, 1), targets.flatten(0, 1), flat_weights).view(logits.shape[:2])


def _batches(client: FLClient, batch_size: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The index batches ``fit``'s shuffled DataLoader yields, in order: drawn by a DataLoader of the same
    length, batch size and seeded generator (the draws depend on nothing else), so they are the same."""
    loader = DataLoader(TensorDataset(torch.arange(client.records)), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    return [indices for _ in range(epochs) for (indices,) in loader]


def fit_clients(clients: Sequence[FLClient], config: PrivferConfig, states: Sequence[dict[str, torch.Tensor]],
                shared: list[str], plan: LocalTraining, seeds: Sequence[int]) -> list[LocalUpdate]:
    """What ``[c.fit(config, s, shared, plan, seed=d) for c, s, d in zip(clients, states, seeds)]`` returns,
    computed in chunks of stacked clients (memory bounded by :data:`MAX_CHUNK_VALUES`)."""
    reason = batchable(config, plan)
    if reason is not None:
        raise ValueError(f"clients cannot be trained together: {reason}")
    if not len(clients) == len(states) == len(seeds):
        raise ValueError("one state and one seed per client")
    frames, dim = clients[0].features.shape[1:] if clients else (0, 0)
    hidden = 128 if config.model.hidden_size is None else config.model.hidden_size
    # what one batch keeps for the backward pass, per clip: its frames and, per layer and frame, the projected
    # gates, the gate activations and the states (about 16 hidden-sized vectors)
    per_clip = frames * (dim + 16 * config.model.num_layers * hidden)
    updates: list[LocalUpdate] = []
    start = 0
    while start < len(clients):
        end, most = start, 0  # most: the largest client of the chunk so far (records)
        while end < len(clients):
            largest = max(most, clients[end].records)
            # padded features, plus one padded batch's activations, for every client of the chunk
            values = (end + 1 - start) * (largest * frames * dim + min(largest, plan.batch_size) * per_clip)
            if end > start and values > MAX_CHUNK_VALUES:
                break
            most, end = largest, end + 1
        updates.extend(_fit_chunk(clients[start:end], config, states[start:end], shared, plan, seeds[start:end]))
        start = end
    return updates


def _fit_chunk(clients: Sequence[FLClient], config: PrivferConfig, states: Sequence[dict[str, torch.Tensor]],
               shared: list[str], plan: LocalTraining, seeds: Sequence[int]) -> list[LocalUpdate]:
    feature_dim = clients[0].features.shape[-1]
    template = VFER.from_config(config.model, feature_dim, private=False)
    names = [name for name, _ in template.named_parameters()]
    buffers = [name for name in template.state_dict() if name not in names]
    if buffers:
        raise ValueError(f"the VFER has buffers the batched trainer does not carry: {buffers}")
    count = len(clients)
    params = {name: torch.stack([state[name].detach().float() for state in states]).requires_grad_(True)
              for name in names}
    received = {name: p.detach().clone() for name, p in params.items()} if plan.local_step is not None else {}

    size = max(c.records for c in clients)
    features = clients[0].features.new_zeros((count, size, *clients[0].features.shape[1:]))
    targets = clients[0].targets.new_zeros((count, size, *clients[0].targets.shape[1:]))
    weighted = any(client.weights is not None for client in clients)
    weights = torch.ones(count, size) if weighted else None
    for j, client in enumerate(clients):
        features[j, :client.records] = client.features
        targets[j, :client.records] = client.targets
        if weights is not None and client.weights is not None:
            weights[j, :client.records] = client.weights
    schedules = [_batches(client, plan.batch_size, plan.epochs, seed) for client, seed in zip(clients, seeds)]
    steps = max(len(schedule) for schedule in schedules)

    adam = plan.optimizer == "adam"
    moments = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in params.items()} if adam else {}
    taken = torch.zeros(count, dtype=torch.float64)  # each client's optimizer steps so far
    loss_sums = torch.zeros(count, dtype=torch.float64)
    rows = torch.arange(count)[:, None]
    for step in range(steps):
        width = max(len(schedule[step]) for schedule in schedules if step < len(schedule))  # no wider than needed
        index = torch.zeros(count, width, dtype=torch.long)
        valid = torch.zeros(count, width)
        active = torch.zeros(count, dtype=torch.bool)
        for j, schedule in enumerate(schedules):
            if step < len(schedule):
                batch = schedule[step]
                index[j, :len(batch)] = batch
                valid[j, :len(batch)] = 1.0
                active[j] = True
        counts = valid.sum(dim=1)
        per_clip = _per_clip_loss(plan, template.stacked_forward(params, features[rows, index]),
                                  targets[rows, index], None if weights is None else weights[rows, index]) * valid
        # each client's mean over its own batch; the sum over clients keeps their gradients apart
        per_client = per_clip.sum(dim=1) / counts.clamp(min=1.0)
        grads = torch.autograd.grad(per_client.sum(), list(params.values()))
        loss_sums += (per_clip.sum(dim=1)).detach().double()
        taken += active.double()
        with torch.no_grad():
            for (name, p), grad in zip(params.items(), grads):
                on = active.view(-1, *([1] * (p.dim() - 1)))  # the clients that took this step
                if plan.weight_decay:
                    grad = grad + plan.weight_decay * p
                if adam:
                    m, v = moments[name]
                    b1, b2 = ADAM_BETAS
                    m.copy_(torch.where(on, b1 * m + (1 - b1) * grad, m))
                    v.copy_(torch.where(on, b2 * v + (1 - b2) * grad * grad, v))
                    t = taken.clamp(min=1.0).to(p.dtype).view(on.shape)
                    update = plan.lr / (1 - b1 ** t) * m / (v.sqrt() / (1 - b2 ** t).sqrt() + ADAM_EPS)
                else:
                    update = plan.lr * grad
                p.sub_(torch.where(on, update, torch.zeros_like(update)))
                if plan.local_step is not None:
                    p.copy_(torch.where(on, plan.local_step(p, received[name], plan.lr), p))
    updates = []
    for j, client in enumerate(clients):
        trained = {name: params[name][j].detach().clone() for name in names}
        updates.append(LocalUpdate(
            client=client.client_id,
            delta={name: trained[name] - states[j][name].detach().float() for name in shared},
            personal={name: value for name, value in trained.items() if name not in shared},
            examples=client.records,
            loss=float(loss_sums[j]) / max(client.records * plan.epochs, 1),
            steps=len(schedules[j]),
        ))
    return updates


def fit_many(clients: Sequence[FLClient], config: PrivferConfig, states: Sequence[dict[str, torch.Tensor]],
             shared: list[str], plan: LocalTraining, seeds: Sequence[int]) -> list[LocalUpdate]:
    """Every client's ``fit``: stacked when :func:`batchable` allows it and ``federation.batched_training`` is on,
    one by one otherwise."""
    if config.federation.batched_training and batchable(config, plan) is None and len(clients) > 1:
        return fit_clients(clients, config, states, shared, plan, seeds)
    return [client.fit(config, state, shared, plan, seed=seed) for client, state, seed in zip(clients, states, seeds)]


__all__ = ["batchable", "fit_clients", "fit_many"]
