"""The trainer of distributed DP-SGD at record level: one DP-SGD step per secure sum, noise shares in the sum."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from privfer.config import PrivferConfig
from privfer.errors import ConfigError
from privfer.fl.distributed import run_distributed_round
from privfer.fl.strategies.base import optimizer_step
from privfer.fl.mechanisms.base import Counts, Mechanism, Release, _trust_line, noised_dimension, opacus_ledger
from privfer.fl.rounds import ADAPTATION, TRAINING
from privfer.models.vfer import VFER
from privfer.privacy.distributed import DistributedPlan, calibrate_plan, derived_key, noise_generator, noiseless_plan
from privfer.privacy.ledger import ClientAccount, DistributedAccount, Ledger, build_distributed_ledger
from privfer.privacy.mechanisms import distributed as _distributed

if TYPE_CHECKING:
    from privfer.fl.federation import Federation, RunState


class DistributedDPSGD(Mechanism):
    """One DP-SGD step per secure sum over the union of the cohort's records; noise shares in the sum."""

    privacy = _distributed.MECHANISM
    # how a phase's plan is made from the run's config (NoiselessSGD: the same plan without noise)
    plan_for = staticmethod(calibrate_plan)

    def __init__(self, config: PrivferConfig) -> None:
        super().__init__(config)
        self.plans: dict[str, DistributedPlan] = {}
        self.persons: int | None = None  # person level: the federation's persons (what delta is judged against)

    def protected_records(self, counts: Counts) -> int:
        # one record of the union of every client's records is the protected unit
        return sum(n for group in counts.values() for n in group.values())

    def calibrate(self, counts: Counts, *, feature_dim: int, cohort_size: int, delta: float,
                  only_client: int | None = None, known_noise: dict[int, float] | None = None) -> set[str]:
        if only_client is not None:
            raise ConfigError("a single node's federation (only_client) trains with privacy.mechanism 'local'; "
                              "distributed DP needs every client's share in the secure sum")
        fed = self.config.federation
        phases = {TRAINING: (cohort_size, fed.rounds), ADAPTATION: (len(counts[ADAPTATION]), fed.adaptation_rounds)}
        for phase, (clients, rounds) in phases.items():
            if len(counts[phase]) >= 2:
                self.plans[phase] = self._plan(feature_dim, counts[phase], clients, delta, rounds)
        return set(self.plans)

    def _plan(self, feature_dim: int, counts: dict[int, int], clients: int, delta: float,
              rounds: int) -> DistributedPlan:
        """A phase's plan: the sum bounds the largest ``clients`` clients' records."""
        largest = sum(sorted(counts.values(), reverse=True)[:clients])
        return self.plan_for(self.config, delta=delta, dimension=noised_dimension(self.config, feature_dim),
                             steps=rounds, clients=clients, records=largest, population=len(counts))

    def noise_rng(self, state: "RunState", phase: str, round_index: int, client_id: int) -> np.random.Generator:
        """A client's secret generator for one round (sampling, rounding, noise share)."""
        source = self.config.privacy.noise_source
        if source == "os":
            return noise_generator()
        secret = bytes.fromhex(state.noise_key) if source == "run_key" else str(self.config.seed).encode()
        return noise_generator(derived_key(secret, phase, round_index, client_id))

    def _begin(self, federation: "Federation", state: "RunState", phase: str,
               cohort: list[int]) -> tuple[DistributedPlan, VFER, list[str]]:
        """A round's plan, the global model and its shared parameter names; every selected client's account
        records the round (it is charged whatever happens next)."""
        template = federation.model(state.global_state)
        group = federation.clients[phase]
        for client_id in cohort:
            state.accounts.setdefault((phase, client_id),
                                      DistributedAccount(client_id, phase, group[client_id].records)).record_round()
        return self.plans[phase], template, federation.strategy.shared_names(template)

    def release(self, federation: "Federation", state: "RunState", phase: str, round_index: int, cohort: list[int],
                dropouts: dict[int, str]) -> Release:
        config, strategy = self.config, federation.strategy
        plan, template, shared = self._begin(federation, state, phase, cohort)

        def model_for(client_id: int) -> VFER:
            model = federation.model({**state.global_state, **state.personal_of(client_id, phase, shared)})
            model.train()
            return model

        def personal_step(client_id: int, gradients: dict[str, torch.Tensor]) -> None:
            model = federation.model({**state.global_state, **state.personal_of(client_id, phase, shared)})
            names = [name for name, _ in model.named_parameters() if name not in shared]
            heads = state.mechanism_state.setdefault("personal_optimizer", {})  # checkpointed with the run
            heads[client_id] = optimizer_step(model, names, gradients, *strategy.server_optimizer(phase),
                                              heads.get(client_id))
            state.personal[client_id] = {name: value.detach().clone() for name, value in model.state_dict().items()
                                         if name not in shared}

        result = run_distributed_round(
            model_for=model_for,
            data={c: federation.client(state, phase, c, shared) for c in cohort},
            cohort=cohort,
            dropouts=dropouts,
            shared=shared,
            plan=plan,
            rng_for=lambda c: self.noise_rng(state, phase, round_index, c),
            aggregation=config.aggregation,
            round_id=state.round_id(phase, round_index),
            global_state=state.global_state,
            template=template,
            personal_step=personal_step,
            objective=strategy.objective(phase),
        )
        return Release(included=result.included, aborted=result.aborted,
                       aggregation_seconds=result.seconds_aggregation, bytes_sent=result.bytes_sent,
                       gradient=result.gradient, template=template, shared=shared)

    def ledger(self, accounts: list, delta: float, max_rounds: dict[str, int], not_covered: list[str]) -> Ledger:
        return build_distributed_ledger(accounts, self.plans, noise_source=self.config.privacy.noise_source,
                                        max_rounds=max_rounds, not_covered=not_covered,
                                        unit=self.config.privacy.unit, persons=self.persons,
                                        security=self.config.aggregation.resolved_security)

    def noise_multipliers(self) -> list[float]:
        return [plan.noise_multiplier for plan in self.plans.values()]

    def describe(self, delta: float) -> list[str]:
        plan = self.plans[TRAINING]
        return [
            f"privacy: epsilon {self.config.privacy.epsilon:g} per client for the whole run (record level), "
            f"delta {delta:.3g}, distributed DP-SGD: {plan.family.title} noise in the secure sum "
            f"(noise multiplier {plan.noise_multiplier:.3f} x C in the sum, {plan.steps} steps, sample rate "
            f"{plan.sample_rate:g}), {plan.family.title} RDP accountant (calibrated for a client in every round)",
            _trust_line(plan, self.config.aggregation.resolved_security),
        ]


class Noiseless:
    """A run without DP on the distributed line (``config.algorithm``), mixed into the line's trainer at the run's
    unit: the same rounds, clipping, coins, integer encoding, secure sum and server optimizer, with no noise share
    (the phase's plan is :func:`~privfer.privacy.distributed.noiseless_plan`). So it is the line's ceiling (a
    study's no-DP cell). Not a registered mechanism: a run without DP has no mechanism id, and its ledger says it is
    not private."""

    privacy = None
    id = None
    plan_for = staticmethod(noiseless_plan)

    def ledger(self, accounts: list, delta: float, max_rounds: dict[str, int], not_covered: list[str]) -> Ledger:
        # the ledger of a run without DP, as local training's: every client's rounds, no noise and no epsilon
        plain = [ClientAccount(a.client, a.phase, a.records, None, self.plans[a.phase].sample_rate,
                               rounds_trained=a.rounds_trained) for a in accounts]
        return opacus_ledger(self.config, plain, None, delta, max_rounds, not_covered)

    def noise_multipliers(self) -> list[float]:
        return []


class NoiselessSGD(Noiseless, DistributedDPSGD):
    """Record level without DP: distributed DP-SGD's rounds — the cohort's clipped gradient sums, randomly rounded,
    through the secure sum; the server's optimizer on their mean — with no noise share."""

    title = "no DP (distributed DP-SGD without its noise)"
    takes_local_steps = False

    def describe(self, delta: float) -> list[str]:
        plan = self.plans[TRAINING]
        return [f"privacy: OFF (no DP): distributed DP-SGD's {plan.steps} steps (sample rate {plan.sample_rate:g}, "
                f"clip {plan.max_grad_norm:g}) through the secure sum with no noise, the ceiling of the private "
                "runs; pass --epsilon to train privately"]


TRAINERS = (DistributedDPSGD,)
