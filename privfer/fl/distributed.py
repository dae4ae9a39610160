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
(:func:`privfer.models.clipped_sums.clipped_gradient_sums`): examples do not
interact, so each client's sum equals what it computes alone (tests check it).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch

from privfer.fl.aggregation import round_context, sum_integer_contributions
from privfer.fl.client import FLClient
from privfer.models.clipped_sums import clipped_gradient_sums
from privfer.models.loss import TrainingObjective
from privfer.models.vfer import VFER
from privfer.privacy.distributed import DistributedPlan, decode_sum, encode_contribution, local_noisy_sum


@dataclass
class DistributedRoundResult:
    """What one round produced: the released gradient and what the server saw."""

    gradient: np.ndarray | None  # the noisy mean gradient of the shared parameters, in their order (None: aborted)
    included: list[int]
    aborted: str | None
    seconds_gradients: float  # sampling and the clipped gradient sums
    seconds_aggregation: float
    bytes_sent: dict[int, int]
    seconds_encoding: float = 0.0  # integer encoding and noise shares (all clients)


def sample_records(records: int, sample_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a Poisson sample (each record independently with probability q); all at q = 1."""
    if sample_rate >= 1.0:
        return np.arange(records)
    return np.flatnonzero(rng.random(records) < sample_rate)


class _Batch(NamedTuple):
    """A Poisson sample of one client's clips (possibly empty, which an FLClient cannot be), with their targets
    and weights."""

    features: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor | None

    @property
    def records(self) -> int:
        return len(self.features)


def _rows(client: FLClient, chosen: torch.Tensor) -> _Batch:
    return _Batch(client.features[chosen], client.targets[chosen],
                  None if client.weights is None else client.weights[chosen])


def clipped_sums_by_client(
    models: Callable[[int], VFER],
    batches: Mapping[int, _Batch],
    max_grad_norm: float,
    shared_model: bool,
    objective: TrainingObjective | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """Each client's clipped gradient sum (every parameter) over its batch's clips, their targets and weights.
    ``shared_model``: all clients train the same model, so one batched pass serves them all; otherwise each
    client's own model (its personal layers) runs alone."""
    order = sorted(batches)
    if shared_model:
        model = models(order[0])
        features = torch.cat([batches[c].features for c in order])
        targets = torch.cat([batches[c].targets for c in order])
        weights = None
        if any(batches[c].weights is not None for c in order):
            weights = torch.cat([batches[c].weights if batches[c].weights is not None
                                 else torch.ones(batches[c].records) for c in order])
        groups = torch.cat([torch.full((batches[c].records,), i, dtype=torch.long) for i, c in enumerate(order)])
        sums = clipped_gradient_sums(model, features, targets, groups, len(order), max_grad_norm, weights=weights,
                                     objective=objective).sums
        return {c: {name: value[i] for name, value in sums.items()} for i, c in enumerate(order)}
    result = {}
    for c in order:
        batch = batches[c]
        sums = clipped_gradient_sums(models(c), batch.features, batch.targets,
                                     torch.zeros(batch.records, dtype=torch.long), 1, max_grad_norm,
                                     weights=batch.weights, objective=objective).sums
        result[c] = {name: value[0] for name, value in sums.items()}
    return result


def run_distributed_round(
    *,
    model_for: Callable[[int], VFER],
    data: Mapping[int, FLClient],
    cohort: list[int],
    dropouts: Mapping[int, str],
    shared: list[str],
    plan: DistributedPlan,
    rng_for: Callable[[int], np.random.Generator],
    aggregation,
    round_id: str,
    global_state: dict[str, torch.Tensor],
    template: VFER,
    personal_step: Callable[[int, dict[str, torch.Tensor]], None],
    objective: TrainingObjective | None = None,
) -> DistributedRoundResult:
    """One DP-SGD step's release over the cohort's records, the noise in the securely computed sum: the decoded sum
    over the public expected batch (sample rate x the included clients' records). The strategy applies it
    (:meth:`privfer.fl.strategies.Strategy.server_step`).

    ``personal_step(client, noisy_gradients)`` receives a client's
    personal-layer gradient (FedPer: every trainable parameter not in
    ``shared``; full local noise, divided by its expected batch) and applies it
    on the client; it is not called when every parameter is shared (FedAvg).
    ``data`` holds each client's clips, targets and weights; ``objective`` is
    the strategy's training objective (the label term by default).
    """
    started = time.perf_counter()
    rngs = {c: rng_for(c) for c in cohort}
    batches = {}
    for c in cohort:
        chosen = torch.from_numpy(sample_records(data[c].records, plan.sample_rate, rngs[c]))
        batches[c] = _rows(data[c], chosen)
    personal = [n for n, p in template.named_parameters() if p.requires_grad and n not in shared]
    sums = clipped_sums_by_client(model_for, batches, plan.max_grad_norm, shared_model=not personal,
                                  objective=objective)
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
                noisy[name] = torch.from_numpy(values / (plan.sample_rate * data[c].records))
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
        return DistributedRoundResult(None, [], summed.aborted, gradient_seconds, summed.seconds, summed.bytes_sent,
                                      encoding_seconds)
    expected_batch = plan.sample_rate * sum(data[c].records for c in summed.included)
    return DistributedRoundResult(decode_sum(summed.total, plan) / expected_batch, list(summed.included), None,
                                  gradient_seconds, summed.seconds, summed.bytes_sent, encoding_seconds)


__all__ = ["DistributedRoundResult", "clipped_sums_by_client", "run_distributed_round", "sample_records"]
