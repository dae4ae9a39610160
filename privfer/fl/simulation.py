"""Federated VFER training in one process: private clients, a strategy, secure aggregation, two phases.

Phase 1 (training): each round samples ``clients_per_round`` of the training
actors; each trains the VFER on its clips with partial labels (DP-SGD when
private), some drop out at a random protocol stage, the survivors' updates
are securely summed, and the strategy applies the weighted mean.
Phase 2 (adaptation, optional, as in the seed paper): the test actors train
on their adaptation halves with the IFER's pseudo labels (mean frame
probabilities, top probability > threshold), lr 1e-5, 1 epoch; the model is
evaluated on their evaluation halves.

Under FedPer the test actors are newcomers without a personal head: they
start from the example-weighted mean of the training clients' heads, summed
through the same secure aggregation once at the end of phase 1, and
personalize it in phase 2.

Every round ends with an atomic checkpoint; rerunning the same command on the
same run directory continues after the last finished round and ends with the
same result as an uninterrupted run (exactly, with the plain aggregator and
the run key kept in the checkpoint (``privacy.noise_source: run_key``); masking's stochastic rounding draws from
the OS and moves the last bits).
"""

from __future__ import annotations

import json
import secrets
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from privfer.config import PrivferConfig
from privfer.data import load_clips
from privfer.data.clips import ClipSet
from privfer.data.labels import evaluation_labels, pseudo_labels, training_targets
from privfer.data.splits import split_actors, split_clips
from privfer.errors import ConfigError, RunDirectoryError
from privfer.evaluation import predict, pseudo_label_report
from privfer.fl.aggregation import sum_updates
from privfer.fl.client import FLClient
from privfer.fl.mechanisms import Mechanism, make_mechanism, public_client_seed
from privfer.fl.results import AggregationSummary, DataSummary, PrivacySummary, RoundCounts, SimulationResult
from privfer.fl.rounds import ADAPTATION, TRAINING, RoundRecord, draw_cohort
from privfer.fl.strategies import Strategy, make_strategy
from privfer.fl.strategies.base import check_portable, checked_client_data
from privfer.metrics import classification_report
from privfer.models.vfer import VFER, ifer_from_config
from privfer.privacy.ledger import ClientAccount, Ledger, account_from_state, write_ledger
from privfer.runs import atomic_torch_save, atomic_write_json, load_checkpoint, prepare_run_dir, save_checkpoint
from privfer.secagg.backends import BACKENDS

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
LEDGER = "privacy_ledger.json"
IFER_NOT_COVERED = ("the IFER that pseudo-labels phase 2 is fitted on the training actors' frames without DP (it stands "
                    "in for a public pretrained model); set model.ifer_weights to use one")
ROUNDS = "rounds.json"
@dataclass
class Federation:
    """Everything the simulation needs, prepared before the run directory is touched."""

    config: PrivferConfig
    strategy: Strategy
    mechanism: Mechanism  # how rounds are made private: calibrated plans, the round, the ledger
    parts: dict[str, ClipSet]
    clients: dict[str, dict[int, FLClient]]
    delta: float
    pseudo: dict[str, Any] | None
    feature_dim: int
    cohort_size: int = 0  # training clients per round

    @property
    def private(self) -> bool:
        return self.config.privacy.enabled

    @property
    def plans(self) -> dict[str, Any]:
        """The mechanism's calibrated plans per phase (local: per client; distributed: one per phase)."""
        return self.mechanism.plans

    def model(self, state: dict[str, torch.Tensor]) -> VFER:
        model = VFER.from_config(self.config.model, self.feature_dim, private=self.private)
        model.load_state_dict(state)
        return model

    def client(self, state: "_State", phase: str, client_id: int, shared: list[str]) -> FLClient:
        """Client ``client_id`` as it trains this round: its clips with the targets and weights the strategy gives
        them (:meth:`~privfer.fl.strategies.Strategy.client_data`, checked), its per-client state updated."""
        client = self.clients[phase][client_id]
        strategy = self.strategy

        def model() -> VFER:
            return self.model({**state.global_state, **state.personal_of(client_id, phase, shared)})

        data, kept = strategy.client_data(phase, client_id, client.features, client.targets, model,
                                          state.strategy_clients.get(client_id))
        data = checked_client_data(strategy, client_id, client.records, client.targets, data)
        if kept is not None or client_id in state.strategy_clients:
            check_portable(kept, f"strategy {strategy.name!r}, client {client_id}")
            state.strategy_clients[client_id] = kept
        return client if data is None else client.with_targets(data.targets, data.weights)

    def cohort(self, phase: str, round_index: int) -> tuple[list[int], dict[int, str]]:
        """Who trains this round and who drops out at which stage (from the run seed: the same on resume)."""
        ids = sorted(self.clients[phase])
        size = self.cohort_size if phase == TRAINING else len(ids)
        return draw_cohort(self.config.seed, ids, size, self.config.federation.dropout, phase, round_index)


@dataclass
class _State:
    global_state: dict[str, torch.Tensor]
    personal: dict[int, dict[str, torch.Tensor]]
    accounts: dict[tuple[str, int], ClientAccount]
    records: list[RoundRecord] = field(default_factory=list)
    server_optimizer: dict[str, dict | None] = field(default_factory=dict)  # phase -> optimizer state (distributed)
    personal_optimizer: dict[int, dict] = field(default_factory=dict)  # FedPer clients' head optimizers (distributed)
    strategy_clients: dict[int, Any] = field(default_factory=dict)  # the strategy's per-client state (client_data)
    newcomer_head: dict[str, torch.Tensor] | None = None
    after_training: dict[str, Any] | None = None
    elapsed: float = 0.0
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))
    # Seeds the clients' DP noise and Poisson sampling (privacy.noise_source run_key): drawn from the OS,
    # kept only in the checkpoint (deleted when the run ends), never in the config, ledger or result.
    noise_key: str = field(default_factory=lambda: secrets.token_hex(32))

    def personal_of(self, client_id: int, phase: str, shared: list[str]) -> dict[str, torch.Tensor]:
        """The parameters a client keeps: its own, or (first round) the newcomer head / the initial ones."""
        head = self.personal.get(client_id)
        if head is None:
            head = self.newcomer_head if phase == ADAPTATION and self.newcomer_head is not None else {
                name: value for name, value in self.global_state.items() if name not in shared}
        return head

    def round_id(self, phase: str, round_index: int) -> str:
        """Binds every protocol message of a round to this run and this round."""
        return f"{self.nonce}:{phase}:{round_index}"

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "global": self.global_state,
            "personal": self.personal,
            "accounts": [a.to_state() for a in self.accounts.values()],
            "records": [asdict(r) for r in self.records],
            "server_optimizer": self.server_optimizer,
            "personal_optimizer": self.personal_optimizer,
            "strategy_clients": self.strategy_clients,
            "newcomer_head": self.newcomer_head,
            "after_training": self.after_training,
            "elapsed": self.elapsed,
            "nonce": self.nonce,
            "noise_key": self.noise_key,
        }

    @classmethod
    def from_checkpoint(cls, raw: dict[str, Any]) -> "_State":
        accounts = [account_from_state(a) for a in raw["accounts"]]
        return cls(
            global_state=raw["global"],
            personal={int(k): v for k, v in raw["personal"].items()},
            accounts={(a.phase, a.client): a for a in accounts},
            records=[RoundRecord(**r) for r in raw["records"]],
            server_optimizer=raw.get("server_optimizer", {}),
            personal_optimizer={int(k): v for k, v in raw.get("personal_optimizer", {}).items()},
            strategy_clients={int(k): v for k, v in raw.get("strategy_clients", {}).items()},
            newcomer_head=raw["newcomer_head"],
            after_training=raw["after_training"],
            elapsed=raw["elapsed"],
            nonce=raw["nonce"],
            noise_key=raw["noise_key"],
        )


def prepare_federation(
    config: PrivferConfig,
    clips: ClipSet | None = None,
    *,
    only_client: int | None = None,
    known_noise: dict[int, float] | None = None,
) -> Federation:
    """Load data, split actors, build clients and calibrate noise; every mistake is raised here.

    ``only_client``: a deployment node that holds one training actor needs only
    that client's noise plan (the calibration is per client) and no adaptation
    phase; the others' plans are left out. ``known_noise``: training clients'
    noise multipliers calibrated earlier in the run, checked instead of searched.
    """
    fed = config.federation
    strategy = make_strategy(fed)  # an unknown strategy or a bad option is refused before any data is read
    mechanism = make_mechanism(config)
    if strategy.needs_local_steps and not mechanism.takes_local_steps:
        raise ConfigError(f"federation.strategy '{strategy.name}' changes how clients train locally, and "
                          f"{mechanism.title} takes no local steps (one step on the global model per "
                          "round); use privacy.unit 'person' or privacy.mechanism 'local', or another strategy")
    if strategy.couples_records and mechanism.privacy is not None and mechanism.privacy.unit == "record":
        raise ConfigError(f"federation.strategy '{strategy.name}' makes a clip's target depend on the client's other "
                          f"clips, which record-level DP does not bound ({mechanism.title} clips each record's "
                          "gradient alone); use privacy.unit 'person', or another strategy")
    clips = load_clips(config.data) if clips is None else clips
    split = split_actors(clips, config.data.split, config.seed)
    parts = split_clips(clips, split)
    temperature = config.data.partial_label_temperature
    train = parts["train"]
    targets = training_targets(train, config.training.labels, temperature)
    clients: dict[str, dict[int, FLClient]] = {TRAINING: {}, ADAPTATION: {}}
    for actor in train.actor_list():
        mask = train.actor_ids == actor
        clients[TRAINING][actor] = FLClient(actor, train.features[mask], targets[mask])
    cohort_size = fed.cohort_size(config.mechanism, len(clients[TRAINING]))
    if cohort_size > len(clients[TRAINING]):
        raise ConfigError(
            f"federation.clients_per_round = {cohort_size} is more than the "
            f"{len(clients[TRAINING])} training clients; allowed: 2 to {len(clients[TRAINING])}"
        )
    if only_client is not None and only_client not in clients[TRAINING]:
        raise ConfigError(f"actor {only_client} is not a training actor of this split")
    if only_client is not None and fed.adaptation:
        raise ConfigError("federation.adaptation must be false for a single node's federation (only_client)")
    pseudo = None
    if fed.adaptation:
        adapt = parts["test_adapt"]
        ifer = ifer_from_config(config.model, train, config.seed)
        labels, keep = pseudo_labels(ifer.frame_probabilities(adapt.features), config.data.pseudo_label_threshold)
        pseudo = pseudo_label_report(adapt, labels, keep, config.data)
        for actor in adapt.actor_list():
            mask = (adapt.actor_ids == actor) & keep
            if mask.any():
                clients[ADAPTATION][actor] = FLClient(actor, adapt.features[mask], labels[mask].astype(np.int64))
    counts = {phase: {c: client.records for c, client in group.items()} for phase, group in clients.items()}
    delta = config.privacy.delta if config.privacy.delta is not None else mechanism.default_delta(counts)
    mechanism.check_delta(delta, counts)
    runnable = mechanism.calibrate(counts, feature_dim=clips.feature_dim, cohort_size=cohort_size, delta=delta,
                                   only_client=only_client, known_noise=known_noise)
    if ADAPTATION not in runnable:
        clients[ADAPTATION] = {}  # fewer than two newcomers with pseudo labels: nothing to aggregate securely
    return Federation(config, strategy, mechanism, parts, clients, delta, pseudo, clips.feature_dim,
                      cohort_size)


def _schedule(config: PrivferConfig, federation: Federation) -> list[tuple[str, int]]:
    steps = [(TRAINING, r) for r in range(1, config.federation.rounds + 1)]
    if federation.clients[ADAPTATION]:
        steps += [(ADAPTATION, r) for r in range(1, config.federation.adaptation_rounds + 1)]
    return steps


def _evaluate(federation: Federation, state: _State, clips: ClipSet, phase: str) -> dict[str, Any]:
    """Macro/micro/per-class scores on ``clips``; the strategy picks the model each actor is scored with."""

    def scores(actor: int | None, features: np.ndarray) -> np.ndarray:
        head: dict[str, torch.Tensor] = {}
        if actor is not None:
            head = state.personal.get(actor) if phase == ADAPTATION else None
            head = head if head is not None else state.newcomer_head
        return predict(federation.model({**state.global_state, **head}), features)

    predicted = federation.strategy.predict(clips.features, clips.actor_ids, scores).argmax(axis=1)
    return classification_report(evaluation_labels(clips, federation.config.data.eval_target), predicted)


def _run_round(federation: Federation, state: _State, phase: str, round_index: int) -> RoundRecord:
    """The mechanism's round, then (FedAvg, training phase) the validation score the simulation reports."""
    record = federation.mechanism.run_round(federation, state, phase, round_index)
    if phase == TRAINING and federation.strategy.one_global_model:
        record.val_macro_f1 = _evaluate(federation, state, federation.parts["val"], phase)["macro"]["f1"]
    return record


def _newcomer_head(federation: Federation, state: _State) -> dict[str, torch.Tensor] | None:
    """The strategy's start for newcomers (FedPer: the securely summed, example-weighted mean of the heads)."""
    trained = sorted(c for c in state.personal if (TRAINING, c) in state.accounts)
    heads = {c: state.personal[c] for c in trained}
    weights = {c: federation.clients[TRAINING][c].records for c in trained}

    def weighted_mean(heads: dict, weights: dict) -> dict[str, torch.Tensor]:
        summed = sum_updates(heads, weights, None, federation.config.aggregation,
                             round_id=f"{state.nonce}:newcomer-head", weight_scale=max(weights.values()))
        if summed.aborted is not None:
            raise RuntimeError(f"the newcomer head could not be aggregated: {summed.aborted}")
        if summed.clipped:
            warnings.warn(
                f"{summed.clipped} values of the clients' heads exceeded aggregation.clipping_range "
                f"{federation.config.aggregation.clipping_range:g} and were clipped in the newcomer head",
                stacklevel=2,
            )
        return {name: (value / summed.total_weight).float() for name, value in summed.weighted_sum.items()}

    return federation.strategy.newcomer_head(heads, weights, weighted_mean)


def simulate(
    config: PrivferConfig,
    run_dir: Path | None = None,
    *,
    clips: ClipSet | None = None,
    on_start: Callable[[Federation, int, int], None] | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> SimulationResult:
    """Run the federation; with ``run_dir`` write checkpoints, rounds, the ledger and result.json there."""
    started = time.perf_counter()
    if config.training.torch_threads is not None:
        torch.set_num_threads(config.training.torch_threads)
    federation = prepare_federation(config, clips)
    prepared_seconds = time.perf_counter() - started
    resumed = prepare_run_dir(run_dir, config, "simulate") if run_dir is not None else False
    if resumed and (run_dir / RESULT).exists():
        return read_result(run_dir)

    torch.manual_seed(config.seed)
    initial = VFER.from_config(config.model, federation.feature_dim, private=federation.private)
    state = _State(global_state={k: v.detach().clone() for k, v in initial.state_dict().items()}, personal={},
                   accounts={})
    checkpoint = run_dir / CHECKPOINT if run_dir is not None else None
    saved = load_checkpoint(checkpoint, resumed)
    if saved is not None:
        state = _State.from_checkpoint(saved)
    elif resumed and (run_dir / ROUNDS).exists():
        raise RunDirectoryError(f"{run_dir} has {ROUNDS} but no {CHECKPOINT}: the rounds it records cannot be "
                                "continued; delete the directory to rerun")
    schedule = _schedule(config, federation)
    done = len(state.records)
    if on_start is not None:
        on_start(federation, done, len(schedule))
    for phase, round_index in schedule[done:]:
        if phase == ADAPTATION and state.after_training is None:
            _finish_training_phase(federation, state)
        round_started = time.perf_counter()
        record = _run_round(federation, state, phase, round_index)
        state.records.append(record)
        state.elapsed += time.perf_counter() - round_started
        if run_dir is not None:
            save_checkpoint(checkpoint, state.to_checkpoint())
            atomic_write_json(run_dir / ROUNDS, [asdict(r) for r in state.records])
        if on_round is not None:
            on_round(record)
    finish_started = time.perf_counter()
    if state.after_training is None:
        _finish_training_phase(federation, state)
    adapted = any(r.phase == ADAPTATION for r in state.records)
    final = _evaluate(federation, state, federation.parts["test_eval"], ADAPTATION) if adapted else state.after_training
    ledger = _ledger(federation, state)
    state.elapsed += time.perf_counter() - finish_started
    result = _result(federation, state, final, adapted, ledger, prepared_seconds)
    if run_dir is not None:
        atomic_write_json(run_dir / ROUNDS, [asdict(r) for r in state.records])  # also after a kill between writes
        write_ledger(run_dir / LEDGER, ledger)
        if config.output.save_model:
            atomic_torch_save(run_dir / "model.pt", {"global": state.global_state, "personal": state.personal,
                                                     "newcomer_head": state.newcomer_head})
        atomic_write_json(run_dir / RESULT, result.to_json())
        checkpoint.unlink(missing_ok=True)  # the result supersedes it
    return result


def read_result(run_dir: Path) -> SimulationResult:
    """A finished run's result.json (RunDirectoryError if it is not a complete simulate result)."""
    path = Path(run_dir) / RESULT
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirectoryError(f"{path} cannot be read ({exc.__class__.__name__}); delete it to rerun") from None
    return SimulationResult.from_json(raw, str(path))


def _finish_training_phase(federation: Federation, state: _State) -> None:
    state.newcomer_head = _newcomer_head(federation, state)
    state.after_training = _evaluate(federation, state, federation.parts["test_eval"], TRAINING)


def _ledger(federation: Federation, state: _State) -> Ledger:
    config = federation.config
    not_covered = [IFER_NOT_COVERED] if federation.clients[ADAPTATION] and config.model.ifer_weights is None else []
    max_rounds = {TRAINING: config.federation.rounds, ADAPTATION: config.federation.adaptation_rounds}
    return federation.mechanism.ledger(list(state.accounts.values()), federation.delta, max_rounds, not_covered)


def _result(federation: Federation, state: _State, final: dict, adapted: bool, ledger: Ledger,
            prepared_seconds: float) -> SimulationResult:
    config = federation.config
    sigmas = federation.mechanism.noise_multipliers()
    records = state.records
    return SimulationResult(
        strategy=config.federation.strategy,
        aggregator=config.aggregation.backend,
        aggregator_private=BACKENDS[config.aggregation.backend].private,
        security=config.aggregation.resolved_security,
        private=federation.private,
        test=final,
        test_after_training=state.after_training,
        test_after_adaptation=final if adapted else None,
        privacy=PrivacySummary(
            unit=config.privacy.unit,
            mechanism=federation.mechanism.id,
            target_epsilon=config.privacy.epsilon if federation.private else None,
            delta=federation.delta,
            accountant=ledger.accountant,
            epsilon_max=ledger.epsilon_max,
            epsilon_median=ledger.epsilon_median,
            noise_multiplier_min=min(sigmas) if sigmas else None,
            noise_multiplier_max=max(sigmas) if sigmas else None,
        ),
        rounds=RoundCounts(
            training=sum(r.phase == TRAINING for r in records),
            adaptation=sum(r.phase == ADAPTATION for r in records),
            aborted=sum(r.aborted is not None for r in records),
        ),
        clients={phase: len(group) for phase, group in federation.clients.items()},
        pseudo_labels=federation.pseudo,
        secure_aggregation=AggregationSummary(
            seconds=sum(r.aggregation_seconds for r in records),
            bytes_per_client_mean=statistics.mean(r.bytes_per_client for r in records) if records else 0.0,
            clipped_values=sum(r.clipped for r in records),
        ),
        data=DataSummary(
            source=config.data.source,
            train_clips=len(federation.parts["train"]),
            test_eval_clips=len(federation.parts["test_eval"]),
        ),
        seconds=state.elapsed + prepared_seconds,
    )


__all__ = ["Federation", "RoundRecord", "SimulationResult", "prepare_federation", "public_client_seed", "read_result",
           "simulate"]
