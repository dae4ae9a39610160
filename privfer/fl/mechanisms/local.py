"""The trainer of local DP-SGD (each client adds all its noise, Opacus) and of runs without DP."""

from __future__ import annotations

from typing import TYPE_CHECKING

from privfer.config import PrivferConfig
from privfer.fl.aggregation import round_context, sum_updates
from privfer.fl.mechanisms.base import Counts, Mechanism, Release, client_seed, local_training, opacus_ledger
from privfer.fl.rounds import ADAPTATION, TRAINING
from privfer.privacy.calibrate import ClientPlan, plan_clients
from privfer.privacy.ledger import ClientAccount, Ledger
from privfer.privacy.mechanisms import local as _local

if TYPE_CHECKING:
    from privfer.fl.federation import Federation, RunState


class LocalDPSGD(Mechanism):
    """Each client trains with DP-SGD (Opacus) and adds its full noise locally; the update is securely summed."""

    privacy = _local.MECHANISM

    def __init__(self, config: PrivferConfig) -> None:
        super().__init__(config)
        self.plans: dict[str, dict[int, ClientPlan]] = {TRAINING: {}, ADAPTATION: {}}

    @property
    def epsilon(self) -> float | None:
        return self.config.privacy.epsilon

    def calibrate(self, counts: Counts, *, feature_dim: int, cohort_size: int, delta: float,
                  only_client: int | None = None, known_noise: dict[int, float] | None = None) -> set[str]:
        config, fed = self.config, self.config.federation
        common = dict(epsilon=self.epsilon, delta=delta, batch_size=config.training.batch_size,
                      accountant=config.privacy.accountant, max_noise_multiplier=config.privacy.max_noise_multiplier)
        planned = counts[TRAINING] if only_client is None else {only_client: counts[TRAINING][only_client]}
        self.plans[TRAINING] = plan_clients(planned, rounds=fed.rounds, local_epochs=fed.local_epochs,
                                            known_noise=known_noise, **common)
        if len(counts[ADAPTATION]) >= 2:  # fewer newcomers with pseudo labels: nothing to aggregate securely
            self.plans[ADAPTATION] = plan_clients(counts[ADAPTATION], rounds=fed.adaptation_rounds,
                                                  local_epochs=fed.adaptation_epochs, **common)
        return {phase for phase, plans in self.plans.items() if plans}

    def release(self, federation: "Federation", state: "RunState", phase: str, round_index: int, cohort: list[int],
                dropouts: dict[int, str]) -> Release:
        config, strategy = self.config, federation.strategy
        shared = strategy.shared_names(federation.model(state.global_state))
        updates, weights, losses = {}, {}, {}
        for client_id in cohort:
            client = federation.client(state, phase, client_id, shared)
            plan = self.plans[phase][client_id]
            account = state.accounts.setdefault(
                (phase, client_id), ClientAccount(client_id, phase, plan.records, plan.noise_multiplier,
                                                  plan.sample_rate))
            seed = client_seed(config, state.noise_key, phase, round_index, client_id)
            update = client.fit(config, {**state.global_state, **state.personal_of(client_id, phase, shared)},
                                shared, local_training(config, phase, plan.noise_multiplier, strategy),
                                history=account.history, seed=seed)
            account.record_round(update.history)
            if update.personal:  # the strategy's personal layers, kept on the client
                state.personal[client_id] = update.personal
            updates[client_id] = update.delta
            weights[client_id] = strategy.client_weight(update.examples)
            losses[client_id] = update.loss
        scale = max(strategy.client_weight(c.records) for c in federation.clients[phase].values())
        if self.id is not None:
            losses = None  # a client's loss on its clips is not DP-protected: private runs do not release it
        summed = sum_updates(updates, weights, losses, config.aggregation, dropouts=dropouts,
                             round_id=state.round_id(phase, round_index), weight_scale=scale,
                             context=round_context(state.global_state))
        return Release(
            included=summed.included, aborted=summed.aborted, aggregation_seconds=summed.seconds,
            bytes_sent=summed.bytes_sent, clipped=summed.clipped,
            train_loss=summed.loss_sum / len(summed.included) if summed.included and losses is not None else None,
            weighted_sum=summed.weighted_sum, total_weight=summed.total_weight)

    def ledger(self, accounts: list, delta: float, max_rounds: dict[str, int], not_covered: list[str]) -> Ledger:
        return opacus_ledger(self.config, accounts, self.epsilon, delta, max_rounds, not_covered)

    def noise_multipliers(self) -> list[float]:
        return [p.noise_multiplier for plans in self.plans.values() for p in plans.values()
                if p.noise_multiplier is not None]

    def describe(self, delta: float) -> list[str]:
        sigmas = sorted(set(self.noise_multipliers()))
        return [
            f"privacy: epsilon {self.epsilon:g} per client for the whole run (record level), delta {delta:.3g}, "
            f"local DP-SGD on each client, {self.config.privacy.accountant.upper()} accountant, noise multiplier "
            + (f"{sigmas[0]:.3f}" if len(sigmas) == 1 else f"{sigmas[0]:.3f}-{sigmas[-1]:.3f}")
            + " (calibrated for a client that trains in every round)"
        ]


class NoDP(LocalDPSGD):
    """No DP noise: clients train normally; the update is still securely summed (unless the backend is plain)."""

    privacy = None
    id = None
    title = "no DP"

    @property
    def epsilon(self) -> None:
        return None

    def describe(self, delta: float) -> list[str]:
        return ["privacy: OFF (no DP-SGD): pass --epsilon to train privately"]


TRAINERS = (LocalDPSGD, NoDP)
