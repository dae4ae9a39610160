"""One round of record-level distributed DP-SGD: the round's clients' clipped gradients, noised in the sum.

Each client of the round samples its records (Poisson, rate q, from its own
secret generator), sums their per-example gradients clipped to C, encodes
the sum as integers with its noise share
(:func:`privfer.privacy.distributed.encode_contribution`) and submits only
that through secure aggregation. The server unmasks the integer sum, divides
by the public expected batch size ``q x (records of the included clients)``
and takes one step of its optimizer (post-processing). No count, loss or
metric leaves a client.

Under FedPer the personal layers' part of each record's clipped gradient
never leaves the client; the client adds the FULL noise (variance mu, the
same family) to it and steps its own optimizer on it, so whatever the
personal layers reveal later is at least as private as the shared release.

A simulation may compute every client's clipped sum in one batched pass
(:func:`privfer.fl.clipped_sums.clipped_gradient_sums`): examples do not
interact, so each client's sum equals what it computes alone (tests check it).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from privfer.fl.aggregation import round_context, sum_integer_contributions
from privfer.models.vfer import VFER
from privfer.fl.clipped_sums import clipped_gradient_sums
from privfer.privacy.distributed import DistributedPlan, decode_sum, encode_contribution, local_noisy_sum


@dataclass
class DistributedRoundResult:
    """What one round produced: the new shared state and what the server saw."""

    global_state: dict[str, torch.Tensor]
    server_optimizer: dict | None
    included: list[int]
    aborted: str | None
    seconds_gradients: float  # sampling and the clipped gradient sums
    seconds_aggregation: float
    bytes_sent: dict[int, int]
    seconds_encoding: float = 0.0  # integer encoding and noise shares (all clients)


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


def sample_records(records: int, sample_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a Poisson sample (each record independently with probability q); all at q = 1."""
    if sample_rate >= 1.0:
        return np.arange(records)
    return np.flatnonzero(rng.random(records) < sample_rate)


def clipped_sums_by_client(
    models: Callable[[int], VFER],
    batches: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    max_grad_norm: float,
    shared_model: bool,
) -> dict[int, dict[str, torch.Tensor]]:
    """Each client's clipped gradient sum (every parameter). ``shared_model``: all clients train the same model,
    so one batched pass serves them all; otherwise each client's own model (its personal layers) runs alone."""
    order = sorted(batches)
    if shared_model:
        model = models(order[0])
        features = torch.cat([batches[c][0] for c in order])
        targets = torch.cat([batches[c][1] for c in order])
        groups = torch.cat([torch.full((len(batches[c][0]),), i, dtype=torch.long) for i, c in enumerate(order)])
        sums = clipped_gradient_sums(model, features, targets, groups, len(order), max_grad_norm).sums
        return {c: {name: value[i] for name, value in sums.items()} for i, c in enumerate(order)}
    result = {}
    for c in order:
        x, y = batches[c]
        sums = clipped_gradient_sums(models(c), x, y, torch.zeros(len(x), dtype=torch.long), 1,
                                     max_grad_norm).sums
        result[c] = {name: value[0] for name, value in sums.items()}
    return result


def run_distributed_round(
    *,
    model_for: Callable[[int], VFER],
    data: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    cohort: list[int],
    dropouts: Mapping[int, str],
    shared: list[str],
    plan: DistributedPlan,
    rng_for: Callable[[int], np.random.Generator],
    aggregation,
    round_id: str,
    global_state: dict[str, torch.Tensor],
    template: VFER,
    server: tuple[str, float, float],
    server_state: dict | None,
    personal_step: Callable[[int, dict[str, torch.Tensor]], None],
) -> DistributedRoundResult:
    """One DP-SGD step over the cohort's records with the noise in the securely computed sum.

    ``personal_step(client, noisy_gradients)`` receives a client's
    personal-layer gradient (FedPer: every trainable parameter not in
    ``shared``; full local noise, divided by its expected batch) and applies it
    on the client; it is not called when every parameter is shared (FedAvg).
    """
    started = time.perf_counter()
    rngs = {c: rng_for(c) for c in cohort}
    batches = {}
    for c in cohort:
        x, y = data[c]
        chosen = torch.from_numpy(sample_records(len(x), plan.sample_rate, rngs[c]))
        batches[c] = (x[chosen], y[chosen])
    personal = [n for n, p in template.named_parameters() if p.requires_grad and n not in shared]
    sums = clipped_sums_by_client(model_for, batches, plan.max_grad_norm, shared_model=not personal)
    gradient_seconds = time.perf_counter() - started
    encoding_started = time.perf_counter()

    def contribute(c: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        # Each client's own generator, used in the same order whichever thread runs it.
        flat = torch.cat([sums[c][name].reshape(-1) for name in shared]).numpy()
        contribution = encode_contribution(flat, plan, rngs[c])
        noisy = {}
        if personal:
            for name in personal:
                values = local_noisy_sum(sums[c][name].reshape(-1).numpy(), plan, rngs[c])
                noisy[name] = torch.from_numpy(values / (plan.sample_rate * len(data[c][0])))
        return contribution, noisy

    # numpy's samplers release the GIL: the clients' noise shares are drawn in parallel.
    with ThreadPoolExecutor(max_workers=min(len(cohort), torch.get_num_threads(), 8)) as pool:
        made = dict(zip(cohort, pool.map(contribute, cohort)))
    contributions = {c: made[c][0] for c in cohort}
    if personal:
        for c in cohort:
            personal_step(c, made[c][1])
    encoding_seconds = time.perf_counter() - encoding_started
    summed = sum_integer_contributions(contributions, dropouts, aggregation, plan, round_id=round_id,
                                       context=round_context(global_state, plan))
    if summed.aborted is not None:
        return DistributedRoundResult(global_state, server_state, [], summed.aborted, gradient_seconds,
                                      summed.seconds, summed.bytes_sent, encoding_seconds)
    expected_batch = plan.sample_rate * sum(len(data[c][0]) for c in summed.included)
    new_state, new_server_state = server_step(decode_sum(summed.total, plan) / expected_batch, global_state,
                                              template, shared, server, server_state)
    return DistributedRoundResult(new_state, new_server_state, list(summed.included), None, gradient_seconds,
                                  summed.seconds, summed.bytes_sent, encoding_seconds)


def server_step(
    gradient: np.ndarray,
    global_state: dict[str, torch.Tensor],
    template: VFER,
    shared: list[str],
    server: tuple[str, float, float],
    server_state: dict | None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The server's optimizer step on the shared parameters with a flat (decoded, divided) gradient, in
    ``shared``'s order; returns the new global state and optimizer state. Post-processing of the release."""
    gradients, at = {}, 0
    for name in shared:
        size = global_state[name].numel()
        gradients[name] = torch.from_numpy(gradient[at : at + size])
        at += size
    if at != gradient.size:
        raise ValueError(f"the released sum has {gradient.size} coordinates, the shared parameters {at}")
    template.load_state_dict(global_state)
    kind, lr, momentum = server
    new_server_state = optimizer_step(template, shared, gradients, kind, lr, momentum, server_state)
    new_state = {name: value.detach().clone() for name, value in template.state_dict().items()}
    for name in global_state:
        if name not in shared:
            new_state[name] = global_state[name]
    return new_state, new_server_state


__all__ = ["DistributedRoundResult", "clipped_sums_by_client", "optimizer_step", "run_distributed_round",
           "sample_records", "server_step"]
