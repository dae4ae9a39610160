"""The trainer of distributed DP-FedAvg at person level: clipped whole updates (or zeros by a secret coin) and noise
shares in the secure sum."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from privfer.fl.aggregation import round_context, sum_integer_contributions
from privfer.fl.batched import fit_many
from privfer.fl.mechanisms.base import Counts, Release, _trust_line, client_seed, local_training, noised_dimension
from privfer.fl.mechanisms.distributed import DistributedDPSGD, Noiseless
from privfer.fl.rounds import TRAINING
from privfer.privacy.distributed import DistributedPlan, decode_sum
from privfer.privacy.mechanisms import distributed_person as _distributed_person
from privfer.privacy.person import mean_update, person_contribution, secret_coin

if TYPE_CHECKING:
    from privfer.fl.federation import Federation, RunState


class DistributedDPFedAvg(DistributedDPSGD):
    """Person level: each selected client's clipped whole update (or zeros, by its secret coin) plus a noise
    share, summed securely; the server steps on the mean over a public denominator
    (:mod:`privfer.privacy.person`)."""

    privacy = _distributed_person.MECHANISM

    def protected_records(self, counts: Counts) -> int:
        # the protected unit is a person: delta is judged against the federation's persons
        return sum(len(group) for group in counts.values())

    def calibrate(self, counts: Counts, **kwargs) -> set[str]:
        self.persons = self.protected_records(counts)
        return super().calibrate(counts, **kwargs)

    def _plan(self, feature_dim: int, counts: dict[int, int], clients: int, delta: float,
              rounds: int) -> DistributedPlan:
        """Each person moves the sum by at most S (its clipped update), so the sum's bound counts ``clients``
        units of S; the sensitivity covers the shared parameters (:func:`noised_dimension`)."""
        return self.plan_for(self.config, delta=delta, dimension=noised_dimension(self.config, feature_dim),
                             steps=rounds, clients=clients, records=clients, population=len(counts))

    def release(self, federation: "Federation", state: "RunState", phase: str, round_index: int, cohort: list[int],
                dropouts: dict[int, str]) -> Release:
        config = self.config
        plan, template, shared = self._begin(federation, state, phase, cohort)
        training = local_training(config, phase, None, federation.strategy)
        rngs, coins, states, seeds = {}, {}, [], []
        for client_id in cohort:
            rngs[client_id] = self.noise_rng(state, phase, round_index, client_id)
            coins[client_id] = secret_coin(rngs[client_id], plan.sample_rate)
            states.append({**state.global_state, **state.personal_of(client_id, phase, shared)})
            seeds.append(client_seed(config, state.noise_key, phase, round_index, client_id))
        # Constant work: every selected client trains whatever its coin says, so neither the round's time
        # (recorded in rounds.json) nor an error tells the coin (Mechanism docs, "what breaks it").
        clients = [federation.client(state, phase, c, shared) for c in cohort]
        updates = fit_many(clients, config, states, shared, training, seeds)
        contributions = {}
        for client_id, update in zip(cohort, updates):
            flat = torch.cat([update.delta[name].reshape(-1) for name in shared]).double().numpy()
            contributions[client_id] = person_contribution(flat, coins[client_id], plan, rngs[client_id])
        summed = sum_integer_contributions(contributions, dropouts, config.aggregation, plan,
                                           round_id=state.round_id(phase, round_index),
                                           context=round_context(state.global_state, plan))
        # the server steps against the negated mean update over the public denominator
        gradient = None if summed.aborted is not None else \
            -mean_update(decode_sum(summed.total, plan), plan, len(summed.included))
        return Release(included=list(summed.included), aborted=summed.aborted, aggregation_seconds=summed.seconds,
                       bytes_sent=summed.bytes_sent, gradient=gradient, template=template, shared=shared)

    def describe(self, delta: float) -> list[str]:
        plan, privacy = self.plans[TRAINING], self.config.privacy
        return [
            f"privacy: epsilon {privacy.epsilon:g} per PERSON (all of a client's clips) for the whole run, delta "
            f"{delta:.3g}, distributed DP-FedAvg: each update clipped to {plan.max_grad_norm:g}, {plan.family.title} "
            f"noise in the secure sum (noise multiplier {plan.noise_multiplier:.3f} x S in the sum, {plan.steps} "
            f"rounds, secret participation {plan.sample_rate:g}), {plan.family.title} RDP accountant (calibrated for "
            "a person "
            "selected in every round)",
            _trust_line(plan, self.config.aggregation.resolved_security),
        ]


class NoiselessFedAvg(Noiseless, DistributedDPFedAvg):
    """Person level without DP: distributed DP-FedAvg's rounds — each selected client's clipped whole update (or
    zeros, by its coin), randomly rounded, through the secure sum; the server's optimizer on the mean over the public
    denominator — with no noise share."""

    title = "no DP (distributed DP-FedAvg without its noise)"

    def describe(self, delta: float) -> list[str]:
        plan = self.plans[TRAINING]
        return [f"privacy: OFF (no DP): distributed DP-FedAvg's {plan.steps} rounds (updates clipped to "
                f"{plan.max_grad_norm:g}, participation {plan.sample_rate:g}) through the secure sum with no noise, "
                "the ceiling of the private person-level runs; pass --epsilon to train privately"]


TRAINERS = (DistributedDPFedAvg,)
