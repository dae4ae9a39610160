"""Distributed DP for other FL code: plan a run, contribute on a client, decode on the server, write the ledger.

A torch-free recipe for person-level distributed DP (DP-FedAvg with the noise
in the secure sum; docs/privacy-accounting.md, "Person level") that a plain
NumPy or PyTorch federated loop can call without privfer's simulation::

    from privfer.privacy import recipe
    from privfer.secagg import aggregate

    plan = recipe.plan_run(epsilon=3.0, delta=1e-5, rounds=20, clients=10, dimension=d)
    config = recipe.secagg_config(plan)                      # active security by default
    for round in range(20):
        contributions = {c: [recipe.contribute(update_of(c), plan)] for c in clients}   # on each client
        summed = aggregate(contributions, config, enrollments=enrollments)             # the secure sum
        model += server_lr * recipe.mean_update(summed.total[0], plan, len(summed.included))
        ledger.record(summed.included)
    recipe.write_ledger(path, plan, ledger)                   # `privfer audit path` recomputes every epsilon

Each client's contribution is its update clipped to ``max_update_norm`` (or
zeros, by its secret coin, when ``participation`` < 1), rounded to integers at
the plan's scale, plus its noise share (Skellam by default) — drawn from ChaCha20 keyed by
the OS CSPRNG, never by anything the server holds. The shares are sized so
that the honest clients of any released sum (at least ``min_inputs`` inputs,
at most ``colluders`` of them colluding) carry the calibrated noise; the
secure-aggregation config the recipe builds makes clients refuse smaller sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from privfer.privacy.distributed import DistributedPlan, decode_sum, noise_generator
from privfer.privacy.ledger import DistributedAccount, SecureSumLedger, build_distributed_ledger
from privfer.privacy.ledger import write_ledger as _write_ledger
from privfer.privacy.node import DistributedDP
from privfer.privacy.noise import DEFAULT
from privfer.privacy.person import mean_update as _mean_update
from privfer.privacy.person import person_contribution, secret_coin

PHASE = "training"


def plan_run(*, epsilon: float, delta: float, rounds: int, clients: int, dimension: int,
             max_update_norm: float = 1.0, participation: float = 1.0, min_inputs_fraction: float = 0.9,
             colluding_fraction: float = 0.1, rounding_overhead: float = 0.01, modulus_bits: int = 64,
             max_noise_multiplier: float = 100.0, noise: str = DEFAULT) -> DistributedPlan:
    """The noise plan of a whole run: every client's epsilon after ``rounds`` rounds is at most ``epsilon`` at
    ``delta`` (a client in every round), with ``clients`` per round. Raises
    :class:`~privfer.privacy.calibrate.PrivacyBudgetError` when the budget needs more noise than
    ``max_noise_multiplier`` x the update bound, and :class:`~privfer.errors.ConfigError` for settings that
    cannot work or are out of range (the error names the setting; a ConfigError is a ValueError). ``noise``: the family of the shares
    (:data:`privfer.privacy.noise.FAMILIES`). The same plan as a Flower server's
    :class:`~privfer.privacy.node.DistributedDP` at person level."""
    return DistributedDP(
        epsilon=epsilon, rounds=rounds, delta=delta, unit="person", max_update_norm=max_update_norm,
        participation=participation, colluding_fraction=colluding_fraction, min_inputs_fraction=min_inputs_fraction,
        rounding_overhead=rounding_overhead, modulus_bits=modulus_bits, max_noise_multiplier=max_noise_multiplier,
        noise=noise).plan(clients, dimension)


def secagg_config(plan: DistributedPlan, security: str = "active", **fields: object):
    """The :class:`~privfer.secagg.SecAggConfig` of one round of ``plan``: integer encoding with the plan's sum
    bound and modulus, and clients that refuse to unmask fewer than the plan's ``min_inputs`` inputs. Active
    security by default (enrolled clients: :func:`privfer.secagg.enroll_in_process` or a roster certificate)."""
    from privfer.secagg.config import make_config

    return make_config(num_clients=plan.clients, encoding="integer", integer_sum_bound=plan.sum_bound,
                       modulus_bits=plan.modulus_bits, min_inputs=plan.min_inputs, security=security,
                       colluding_fraction=plan.colluders / plan.clients, **fields)


def contribute(update: np.ndarray, plan: DistributedPlan, key: bytes | None = None) -> np.ndarray:
    """On a client: its integer contribution for one round — the update (flattened, any float array of the
    plan's dimension) clipped, or zeros by its secret coin, rounded, plus its noise share. ``key``: 32 secret
    bytes for the client's ChaCha20 stream (default: fresh bytes from the OS CSPRNG each call)."""
    rng = noise_generator(key)
    return person_contribution(np.asarray(update, dtype=np.float64).ravel(), secret_coin(rng, plan.sample_rate),
                               plan, rng)


def mean_update(total: np.ndarray, plan: DistributedPlan, included: int) -> np.ndarray:
    """On the server: the released integer sum (checked against the plan's bound) -> the noisy mean clipped update,
    over the public denominator participation x included clients."""
    return _mean_update(decode_sum(np.asarray(total).ravel(), plan), plan, included)


def mean_gradient(total: np.ndarray, plan: DistributedPlan, records: int) -> np.ndarray:
    """On the server, record level (one DP-SGD step per round): the released integer sum of per-example clipped
    gradients (checked against the plan's bound) -> the noisy mean gradient, over the public expected batch
    sample_rate x ``records`` (the included clients' total record count, public at record level)."""
    if isinstance(records, bool) or not isinstance(records, (int, np.integer)) or records < 1:
        raise ValueError(f"records must be a whole number >= 1 (the included clients' records), got {records!r}")
    return decode_sum(np.asarray(total).ravel(), plan) / (plan.sample_rate * int(records))


@dataclass
class RunLedger:
    """Who was in each released sum: what the accountant charges (a client in every round spends the plan's
    epsilon; fewer rounds, less)."""

    accounts: dict[int, DistributedAccount] = field(default_factory=dict)

    def record(self, included: Iterable[int]) -> None:
        for client in included:
            self.accounts.setdefault(int(client), DistributedAccount(int(client), PHASE, 1)).record_round()

    def epsilon(self, plan: DistributedPlan, client: int) -> float:
        account = self.accounts.get(client)
        return 0.0 if account is None else plan.epsilon(account.rounds_trained)


def ledger(plan: DistributedPlan, run: RunLedger, *, persons: int, security: str = "active") -> SecureSumLedger:
    """The run's privacy ledger in privfer's schema (person level; a validated model, ``.document()`` its JSON),
    which ``privfer audit`` recomputes with its independent accountants."""
    return build_distributed_ledger(list(run.accounts.values()), {PHASE: plan}, noise_source="os",
                                    max_rounds={PHASE: plan.steps}, unit="person", persons=persons,
                                    security=security)


def write_ledger(path: str | Path, plan: DistributedPlan, run: RunLedger, *, persons: int,
                 security: str = "active") -> None:
    """:func:`ledger` written atomically to ``path`` (JSON)."""
    _write_ledger(Path(path), ledger(plan, run, persons=persons, security=security))


__all__ = ["RunLedger", "contribute", "ledger", "mean_gradient", "mean_update", "plan_run", "secagg_config",
           "write_ledger"]
