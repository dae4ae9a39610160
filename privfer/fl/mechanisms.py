"""A federation's privacy mechanism behind one interface: calibration, the round, the ledger, what it promises.

The simulation (and a deployment node built on :func:`privfer.fl.simulation.prepare_federation`)
asks the mechanism, and nothing else, how private the run is:

* :meth:`Mechanism.calibrate` sizes the noise before the run directory is
  touched (every impossible budget is an error here);
* :meth:`Mechanism.run_round` runs one round — the clients' private
  contributions through the configured aggregation backend, and the server's
  update — and returns the round's :class:`~privfer.fl.rounds.RoundRecord`;
* :meth:`Mechanism.ledger` writes the privacy ledger, whose ``mechanism_id``
  selects the auditor in :mod:`privfer.privacy.audit` (``AUDITORS``);
* :meth:`Mechanism.describe` states the promise before the run starts.

Mechanisms: :class:`NoDP` (no noise; the ledger says so), :class:`LocalDPSGD`
(each client runs DP-SGD with its full noise, as if the server saw its update)
and :class:`DistributedDPSGD` (one DP-SGD step per secure sum, the noise split
into shares that only add up to the calibrated variance inside the sum) protect
a record; :class:`DistributedDPFedAvg` protects a person (each client's clipped
whole update, or zeros by its secret coin, with a noise share in the sum). The
strategy (:mod:`privfer.fl.strategies`) decides which parameters are shared;
the mechanism decides how what is shared is made private.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from privfer.config import PrivferConfig
from privfer.errors import ConfigError
from privfer.fl.aggregation import round_context, sum_integer_contributions, sum_updates
from privfer.fl.batched import fit_many
from privfer.fl.client import LocalTraining
from privfer.fl.distributed import optimizer_step, run_distributed_round, server_step
from privfer.privacy.person import mean_update, person_contribution, secret_coin
from privfer.fl.rounds import ADAPTATION, TRAINING, RoundRecord, mean_bytes
from privfer.fl.strategies import make_strategy
from privfer.models.vfer import VFER
from privfer.privacy.calibrate import ClientPlan, default_delta, plan_clients
from privfer.privacy.distributed import DistributedPlan, calibrate_plan, decode_sum, derived_key, noise_generator
from privfer.privacy.ledger import ClientAccount, DistributedAccount, build_distributed_ledger, build_ledger
from privfer.privacy.mechanisms import PrivacyMechanism
from privfer.privacy.mechanisms import distributed as _distributed
from privfer.privacy.mechanisms import distributed_person as _distributed_person
from privfer.privacy.mechanisms import local as _local

if TYPE_CHECKING:
    from privfer.fl.simulation import Federation, _State

Counts = dict[str, dict[int, int]]  # phase -> client -> records


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def public_client_seed(config: PrivferConfig, phase: str, round_index: int, client_id: int) -> int:
    """A client's training seed derived from the run seed alone: for runs without DP noise to keep secret (and
    ``privacy.noise_source: run_seed``). Deployments that train the same clients (the Flower example) use it to
    reproduce ``simulate`` exactly."""
    return _derived_seed(config.seed, 0 if phase == TRAINING else 1, round_index, client_id)


def client_seed(config: PrivferConfig, noise_key: str, phase: str, round_index: int, client_id: int) -> int:
    """The seed of one client's local training (DP noise, Poisson sampling) in one round."""
    if config.privacy.noise_source == "run_seed" or not config.privacy.enabled:  # public: nothing secret to seed
        return public_client_seed(config, phase, round_index, client_id)
    message = f"privfer/client-seed/{phase}/{round_index}/{client_id}".encode()
    digest = hmac.new(bytes.fromhex(noise_key), message, hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def local_training(config: PrivferConfig, phase: str, noise_multiplier: float | None) -> LocalTraining:
    """How a client trains locally in ``phase`` (local DP-SGD or no DP): the one place it is read from the config.
    The strategy's local step (FedProx's proximal operator) applies in the training phase; adaptation fine-tunes the
    final model on pseudo labels as the seed paper does."""
    fed, training = config.federation, config.training
    return LocalTraining(
        lr=fed.local_lr if phase == TRAINING else fed.adaptation_lr,
        epochs=fed.local_epochs if phase == TRAINING else fed.adaptation_epochs,
        batch_size=training.batch_size,
        noise_multiplier=noise_multiplier,
        max_grad_norm=config.privacy.max_grad_norm,
        accountant=config.privacy.accountant,
        noise_source=config.privacy.noise_source,
        weight_decay=training.weight_decay,
        optimizer=fed.local_optimizer,
        local_step=make_strategy(fed).local_step() if phase == TRAINING else None,
    )


def noised_dimension(config: PrivferConfig, feature_dim: int) -> int:
    """The coordinates a distributed plan's sensitivity covers: every trainable one at record level (FedPer's
    personal layers are noised locally with the same variance), only the shared ones at person level (the
    personal layers never leave the client)."""
    template = VFER.from_config(config.model, feature_dim, private=True)
    shared = set(make_strategy(config.federation).shared_names(template)) if config.privacy.unit == "person" else None
    return sum(p.numel() for n, p in template.named_parameters() if p.requires_grad and (shared is None or n in shared))


def _trust_line(plan: DistributedPlan, security: str) -> str:
    server = ("a server that may deviate from the protocol (active security: enrolled members, signed rosters, "
              "consistency check)" if security == "active"
              else "SEMI-HONEST server (trusted to follow the protocol)")
    refuse = (f"clients unmask only when every survivor, at least {plan.min_inputs}, signed the same view"
              if security == "active" else f"clients refuse to unmask fewer than {plan.min_inputs} inputs")
    return (f"trust: {server}, at most {plan.colluders} of {plan.clients} clients per round collude; {refuse}; "
            f"each adds 1/{plan.honest} of the noise variance")


class Mechanism(ABC):
    """How a federation's rounds are made private (see the module docstring)."""

    privacy: ClassVar[PrivacyMechanism | None]  # the registered facts this class trains (privfer.privacy.mechanisms)
    # read from ``privacy`` (None: no DP):
    id: ClassVar[str | None]  # the ledger's mechanism_id; None without DP
    takes_local_steps: ClassVar[bool] = True  # False: one step on the global model per round (no client training)
    title: ClassVar[str]  # in sentences and the run summary
    units: ClassVar[str] = "records"  # what protected_records counts, for messages

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        facts = cls.__dict__.get("privacy")
        if facts is not None:
            cls.id, cls.title, cls.units = facts.id, facts.title, facts.counted
            cls.takes_local_steps = facts.takes_local_steps

    def __init__(self, config: PrivferConfig) -> None:
        self.config = config

    def protected_records(self, counts: Counts) -> int:
        """The records of the largest dataset a record is protected within (local DP: the largest client's)."""
        return max(n for group in counts.values() for n in group.values())

    def default_delta(self, counts: Counts) -> float:
        """1 / (10 x the records of the protected unit's largest dataset)."""
        return default_delta([self.protected_records(counts)])

    def check_delta(self, delta: float, counts: Counts) -> None:
        """A delta of 1 / records (persons) or more is met by publishing one random record (person): refuse it."""
        records = self.protected_records(counts)
        if self.id is not None and delta >= 1.0 / records:
            raise ConfigError(f"privacy.delta = {delta:g} must be below 1 / {records} {self.units} = "
                              f"{1 / records:.3g} (allowed: 0 < delta < {1 / records:.3g}; the default is "
                              f"{1 / (10 * records):.3g})")

    @abstractmethod
    def calibrate(self, counts: Counts, *, feature_dim: int, cohort_size: int, delta: float,
                  only_client: int | None = None, known_noise: dict[int, float] | None = None) -> set[str]:
        """Size the noise for each phase; returns the phases that can run (adaptation needs two clients)."""

    @abstractmethod
    def run_round(self, federation: "Federation", state: "_State", phase: str, round_index: int) -> RoundRecord:
        """One round: the cohort's private contributions, their secure sum, the server's step."""

    @abstractmethod
    def ledger(self, accounts: list, delta: float, max_rounds: dict[str, int], not_covered: list[str]) -> dict:
        """The privacy ledger (JSON-safe) of the run's accounts."""

    @abstractmethod
    def describe(self, delta: float) -> list[str]:
        """What the run promises, in a line or two, printed before it starts."""

    @abstractmethod
    def noise_multipliers(self) -> list[float]:
        """Every calibrated noise multiplier (for the result's summary)."""


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

    def run_round(self, federation: "Federation", state: "_State", phase: str, round_index: int) -> RoundRecord:
        config, strategy = self.config, federation.strategy
        started = time.perf_counter()
        cohort, dropouts = federation.cohort(phase, round_index)
        shared = strategy.shared_names(federation.model(state.global_state))
        updates, weights, losses = {}, {}, {}
        for client_id in cohort:
            client = federation.clients[phase][client_id]
            plan = self.plans[phase][client_id]
            account = state.accounts.setdefault(
                (phase, client_id), ClientAccount(client_id, phase, plan.records, plan.noise_multiplier,
                                                  plan.sample_rate))
            seed = client_seed(config, state.noise_key, phase, round_index, client_id)
            update = client.fit(config, {**state.global_state, **state.personal_of(client_id, phase, shared)},
                                shared, local_training(config, phase, plan.noise_multiplier),
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
        if summed.aborted is None:
            state.global_state = strategy.apply(state.global_state, summed.weighted_sum, summed.total_weight)
        return RoundRecord(
            phase=phase, round=round_index, clients=cohort, included=summed.included,
            dropouts={str(c): s for c, s in dropouts.items()}, aborted=summed.aborted,
            train_loss=summed.loss_sum / len(summed.included) if summed.included and losses is not None else None,
            val_macro_f1=None, seconds=time.perf_counter() - started, aggregation_seconds=summed.seconds,
            bytes_per_client=mean_bytes(summed.bytes_sent), clipped=summed.clipped,
        )

    def ledger(self, accounts: list, delta: float, max_rounds: dict[str, int], not_covered: list[str]) -> dict:
        privacy = self.config.privacy
        return build_ledger(accounts, target_epsilon=self.epsilon, delta=delta, accountant=privacy.accountant,
                            max_grad_norm=privacy.max_grad_norm, noise_source=privacy.noise_source,
                            max_rounds=max_rounds, not_covered=not_covered, unit=privacy.unit)

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


class DistributedDPSGD(Mechanism):
    """One DP-SGD step per secure sum over the union of the cohort's records; noise shares in the sum."""

    privacy = _distributed.MECHANISM

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
        return calibrate_plan(self.config, delta=delta, dimension=noised_dimension(self.config, feature_dim),
                              steps=rounds, clients=clients, records=largest)

    def noise_rng(self, state: "_State", phase: str, round_index: int, client_id: int) -> np.random.Generator:
        """A client's secret generator for one round (sampling, rounding, noise share)."""
        source = self.config.privacy.noise_source
        if source == "os":
            return noise_generator()
        secret = bytes.fromhex(state.noise_key) if source == "run_key" else str(self.config.seed).encode()
        return noise_generator(derived_key(secret, phase, round_index, client_id))

    def run_round(self, federation: "Federation", state: "_State", phase: str, round_index: int) -> RoundRecord:
        config, strategy, fed = self.config, federation.strategy, self.config.federation
        started = time.perf_counter()
        cohort, dropouts = federation.cohort(phase, round_index)
        plan = self.plans[phase]
        template = federation.model(state.global_state)
        shared = strategy.shared_names(template)
        group = federation.clients[phase]
        for client_id in cohort:
            account = state.accounts.setdefault(
                (phase, client_id), DistributedAccount(client_id, phase, group[client_id].records))
            account.record_round()
        lr = fed.server_lr if phase == TRAINING else fed.adaptation_lr

        def model_for(client_id: int) -> VFER:
            model = federation.model({**state.global_state, **state.personal_of(client_id, phase, shared)})
            model.train()
            return model

        def personal_step(client_id: int, gradients: dict[str, torch.Tensor]) -> None:
            model = federation.model({**state.global_state, **state.personal_of(client_id, phase, shared)})
            names = [name for name, _ in model.named_parameters() if name not in shared]
            state.personal_optimizer[client_id] = optimizer_step(
                model, names, gradients, fed.server_optimizer, lr, fed.server_momentum,
                state.personal_optimizer.get(client_id))
            state.personal[client_id] = {name: value.detach().clone() for name, value in model.state_dict().items()
                                         if name not in shared}

        result = run_distributed_round(
            model_for=model_for,
            data={c: (group[c].features, group[c].targets) for c in cohort},
            cohort=cohort,
            dropouts=dropouts,
            shared=shared,
            plan=plan,
            rng_for=lambda c: self.noise_rng(state, phase, round_index, c),
            aggregation=config.aggregation,
            round_id=state.round_id(phase, round_index),
            global_state=state.global_state,
            template=template,
            server=(fed.server_optimizer, lr, fed.server_momentum),
            server_state=state.server_optimizer.get(phase),
            personal_step=personal_step,
        )
        state.global_state = result.global_state
        state.server_optimizer[phase] = result.server_optimizer
        return RoundRecord(
            phase=phase, round=round_index, clients=cohort, included=result.included,
            dropouts={str(c): s for c, s in dropouts.items()}, aborted=result.aborted, train_loss=None,
            val_macro_f1=None, seconds=time.perf_counter() - started, aggregation_seconds=result.seconds_aggregation,
            bytes_per_client=mean_bytes(result.bytes_sent), clipped=0,
        )

    def ledger(self, accounts: list, delta: float, max_rounds: dict[str, int], not_covered: list[str]) -> dict:
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
        return calibrate_plan(self.config, delta=delta, dimension=noised_dimension(self.config, feature_dim),
                              steps=rounds, clients=clients, records=clients)

    def run_round(self, federation: "Federation", state: "_State", phase: str, round_index: int) -> RoundRecord:
        config, strategy, fed = self.config, federation.strategy, self.config.federation
        started = time.perf_counter()
        cohort, dropouts = federation.cohort(phase, round_index)
        plan = self.plans[phase]
        template = federation.model(state.global_state)
        shared = strategy.shared_names(template)
        group = federation.clients[phase]
        training = local_training(config, phase, None)
        rngs, coins, states, seeds = {}, {}, [], []
        for client_id in cohort:
            state.accounts.setdefault((phase, client_id),
                                      DistributedAccount(client_id, phase, group[client_id].records)).record_round()
            rngs[client_id] = self.noise_rng(state, phase, round_index, client_id)
            coins[client_id] = secret_coin(rngs[client_id], plan.sample_rate)
            states.append({**state.global_state, **state.personal_of(client_id, phase, shared)})
            seeds.append(client_seed(config, state.noise_key, phase, round_index, client_id))
        # Constant work: every selected client trains whatever its coin says, so neither the round's time
        # (recorded in rounds.json) nor an error tells the coin (Mechanism docs, "what breaks it").
        updates = fit_many([group[c] for c in cohort], config, states, shared, training, seeds)
        contributions = {}
        for client_id, update in zip(cohort, updates):
            flat = torch.cat([update.delta[name].reshape(-1) for name in shared]).double().numpy()
            contributions[client_id] = person_contribution(flat, coins[client_id], plan, rngs[client_id])
        summed = sum_integer_contributions(contributions, dropouts, config.aggregation, plan,
                                           round_id=state.round_id(phase, round_index),
                                           context=round_context(state.global_state, plan))
        if summed.aborted is None:
            mean = mean_update(decode_sum(summed.total, plan), plan, len(summed.included))
            lr = fed.server_lr if phase == TRAINING else fed.adaptation_lr
            state.global_state, state.server_optimizer[phase] = server_step(
                -mean, state.global_state, template, shared, (fed.server_optimizer, lr, fed.server_momentum),
                state.server_optimizer.get(phase))
        return RoundRecord(
            phase=phase, round=round_index, clients=cohort, included=list(summed.included),
            dropouts={str(c): s for c, s in dropouts.items()}, aborted=summed.aborted, train_loss=None,
            val_macro_f1=None, seconds=time.perf_counter() - started, aggregation_seconds=summed.seconds,
            bytes_per_client=mean_bytes(summed.bytes_sent), clipped=0,
        )

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


# the trainer of each registered privacy mechanism, by its id (None: no DP)
MECHANISMS: dict[str | None, type[Mechanism]] = {
    None: NoDP, **{trainer.id: trainer for trainer in (LocalDPSGD, DistributedDPSGD, DistributedDPFedAvg)}}


def make_mechanism(config: PrivferConfig) -> Mechanism:
    """The trainer of the mechanism the (validated) config resolves to."""
    trainer = MECHANISMS.get(config.mechanism_id)
    if trainer is None:
        raise ConfigError(f"the privacy mechanism {config.mechanism_id!r} is registered (privfer.privacy.mechanisms) "
                          f"but has no trainer in privfer.fl.mechanisms; trained: {sorted(map(str, MECHANISMS))}")
    return trainer(config)



__all__ = ["MECHANISMS", "noised_dimension", "DistributedDPFedAvg", "DistributedDPSGD", "LocalDPSGD", "Mechanism", "NoDP", "client_seed", "local_training",
           "make_mechanism", "public_client_seed"]
