"""The interface every mechanism's trainer implements, and what the trainers share: client seeds, how a client
trains locally, the noised dimension of a distributed plan, the trust line of a promise."""

from __future__ import annotations

import hashlib
import hmac
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from privfer.config import PrivferConfig
from privfer.errors import ConfigError
from privfer.fl.client import LocalTraining
from privfer.fl.rounds import TRAINING, RoundRecord, mean_bytes
from privfer.fl.strategies import Strategy, make_strategy
from privfer.models.vfer import VFER
from privfer.privacy.calibrate import default_delta
from privfer.privacy.distributed import DistributedPlan
from privfer.privacy.ledger import ClientAccount, Ledger, build_ledger
from privfer.privacy.mechanisms import PrivacyMechanism

if TYPE_CHECKING:
    from privfer.fl.federation import Federation, RunState


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


def local_training(config: PrivferConfig, phase: str, noise_multiplier: float | None,
                   strategy: Strategy | None = None) -> LocalTraining:
    """How a client trains locally in ``phase`` (local DP-SGD or no DP): the one place it is read from the config.
    The strategy's local step (FedProx's proximal operator) and objective terms apply in the training phase;
    adaptation fine-tunes the final model on pseudo labels as the seed paper does."""
    fed, training = config.federation, config.training
    strategy = make_strategy(fed) if strategy is None else strategy
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
        local_step=strategy.local_step() if phase == TRAINING else None,
        objective=strategy.objective(phase),
    )


def noised_dimension(config: PrivferConfig, feature_dim: int) -> int:
    """The coordinates a distributed plan's sensitivity covers: every trainable one at record level (FedPer's
    personal layers are noised locally with the same variance), only the shared ones at person level (the
    personal layers never leave the client)."""
    template = VFER.from_config(config.model, feature_dim, private=True)
    shared = set(make_strategy(config.federation).shared_names(template)) if config.privacy.unit == "person" else None
    return sum(p.numel() for n, p in template.named_parameters() if p.requires_grad and (shared is None or n in shared))


def opacus_ledger(config: PrivferConfig, accounts: list[ClientAccount], target_epsilon: float | None, delta: float,
                  max_rounds: dict[str, int], not_covered: list[str]) -> Ledger:
    """The ledger of local DP-SGD (``target_epsilon``: the run's) and of every run without DP (None; it says how
    the run trained: ``config.trained_by``)."""
    privacy = config.privacy
    # the clipping bound of the protected unit: a record's gradient, or (person level, only without DP here) a
    # person's whole update — what privfer audit's cross-check holds the ledger to
    bound = privacy.max_update_norm if privacy.unit == "person" else privacy.max_grad_norm
    return build_ledger(accounts, target_epsilon=target_epsilon, delta=delta, accountant=privacy.accountant,
                        max_grad_norm=bound, noise_source=privacy.noise_source,
                        max_rounds=max_rounds, not_covered=not_covered, unit=privacy.unit,
                        trained_by=None if target_epsilon is not None else config.trained_by)


def _trust_line(plan: DistributedPlan, security: str) -> str:
    server = ("a server that may deviate from the protocol (active security: enrolled members, signed rosters, "
              "consistency check)" if security == "active"
              else "SEMI-HONEST server (trusted to follow the protocol)")
    refuse = (f"clients unmask only when every survivor, at least {plan.min_inputs}, signed the same view"
              if security == "active" else f"clients refuse to unmask fewer than {plan.min_inputs} inputs")
    return (f"trust: {server}, at most {plan.colluders} of {plan.clients} clients per round collude; {refuse}; "
            f"each adds 1/{plan.honest} of the noise variance")


@dataclass
class Release:
    """What one round's secure sum released, before the server applies it (:meth:`Mechanism.run_round`).

    Local DP and no DP release a weighted sum of the clients' updates (``weighted_sum`` over ``total_weight``:
    the strategy adds the weighted mean, :meth:`~privfer.fl.strategies.Strategy.apply`); distributed DP releases
    a flat noisy ``gradient`` of the ``shared`` parameters of ``template`` (the strategy's server optimizer steps
    against it, :meth:`~privfer.fl.strategies.Strategy.server_step`). Nothing is applied when ``aborted``."""

    included: list[int]
    aborted: str | None
    aggregation_seconds: float
    bytes_sent: dict[int, int]
    clipped: int = 0
    train_loss: float | None = None  # the clients' mean loss, securely summed; None in private runs
    weighted_sum: dict[str, torch.Tensor] | None = None
    total_weight: float = 0.0
    gradient: np.ndarray | None = None
    template: VFER | None = None
    shared: list[str] = field(default_factory=list)


class Mechanism(ABC):
    """How a federation's rounds are made private (see the module docstring).

    A mechanism's calibration lives on the instance (rebuilt from the config when a run resumes); what it carries
    from round to round lives in the run's ``state.mechanism_state`` (a dict it owns, checkpointed after every
    round, so a resumed run continues it exactly), never in the instance."""

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

    def run_round(self, federation: "Federation", state: "RunState", phase: str, round_index: int) -> RoundRecord:
        """One round, the same for every mechanism: the cohort, its private contributions through the secure sum
        (:meth:`release`), the strategy's server step on what was released, the round's record."""
        started = time.perf_counter()
        cohort, dropouts = federation.cohort(phase, round_index)
        release = self.release(federation, state, phase, round_index, cohort, dropouts)
        if release.aborted is None:
            strategy = federation.strategy
            if release.gradient is not None:
                state.global_state, state.strategy_server[phase] = strategy.server_step(
                    release.gradient, state.global_state, release.template, release.shared, phase,
                    state.strategy_server.get(phase))
            else:
                state.global_state = strategy.apply(state.global_state, release.weighted_sum, release.total_weight)
        return RoundRecord(
            phase=phase, round=round_index, clients=cohort, included=list(release.included),
            dropouts={str(c): s for c, s in dropouts.items()}, aborted=release.aborted, train_loss=release.train_loss,
            val_macro_f1=None, seconds=time.perf_counter() - started, aggregation_seconds=release.aggregation_seconds,
            bytes_per_client=mean_bytes(release.bytes_sent), clipped=release.clipped,
        )

    @abstractmethod
    def release(self, federation: "Federation", state: "RunState", phase: str, round_index: int, cohort: list[int],
                dropouts: dict[int, str]) -> Release:
        """The cohort's private contributions through the secure sum (their accounts recorded): what it released."""

    @abstractmethod
    def ledger(self, accounts: list, delta: float, max_rounds: dict[str, int], not_covered: list[str]) -> Ledger:
        """The privacy ledger (a validated model) of the run's accounts."""

    @abstractmethod
    def describe(self, delta: float) -> list[str]:
        """What the run promises, in a line or two, printed before it starts."""

    @abstractmethod
    def noise_multipliers(self) -> list[float]:
        """Every calibrated noise multiplier (for the result's summary)."""
