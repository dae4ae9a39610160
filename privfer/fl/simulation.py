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

import hashlib
import hmac
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

from privfer.centralized import evaluation_labels, predict, pseudo_label_report, split_clips, training_targets
from privfer.config import PrivferConfig
from privfer.data import load_clips
from privfer.data.clips import ClipSet
from privfer.data.labels import pseudo_labels
from privfer.data.splits import split_actors
from privfer.errors import ConfigError, RunDirectoryError
from privfer.fl.aggregation import sum_updates
from privfer.fl.client import FLClient, LocalTraining
from privfer.fl.distributed import optimizer_step, run_distributed_round
from privfer.fl.strategies import Strategy, make_strategy
from privfer.metrics import classification_report
from privfer.models.vfer import VFER, ifer_from_config
from privfer.privacy.calibrate import ClientPlan, default_delta, plan_clients
from privfer.privacy.distributed import DistributedPlan, calibrate_distributed, derived_key, noise_generator
from privfer.privacy.ledger import (
    ClientAccount,
    DistributedAccount,
    account_from_state,
    build_distributed_ledger,
    build_ledger,
    write_ledger,
)
from privfer.runs import atomic_torch_save, atomic_write_json, prepare_run_dir
from privfer.secagg import STAGES

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
LEDGER = "privacy_ledger.json"
ROUNDS = "rounds.json"
TRAINING, ADAPTATION = "training", "adaptation"


@dataclass
class RoundRecord:
    """What one round did, as the server sees it (plus the simulation's validation score)."""

    phase: str
    round: int
    clients: list[int]
    included: list[int]
    dropouts: dict[str, str]
    aborted: str | None
    train_loss: float | None  # mean of the clients' mean losses, securely summed; None in private runs
    val_macro_f1: float | None
    seconds: float
    aggregation_seconds: float
    bytes_per_client: float
    clipped: int


@dataclass
class Federation:
    """Everything the simulation needs, prepared before the run directory is touched."""

    config: PrivferConfig
    strategy: Strategy
    parts: dict[str, ClipSet]
    clients: dict[str, dict[int, FLClient]]
    plans: dict[str, dict[int, ClientPlan]]
    delta: float
    pseudo: dict[str, Any] | None
    feature_dim: int
    mechanism: str | None = None  # "distributed", "local", or None without DP
    distributed: dict[str, DistributedPlan] = field(default_factory=dict)  # phase -> plan (distributed DP)
    cohort_size: int = 0  # training clients per round

    @property
    def private(self) -> bool:
        return self.config.privacy.enabled


@dataclass
class _State:
    global_state: dict[str, torch.Tensor]
    personal: dict[int, dict[str, torch.Tensor]]
    accounts: dict[tuple[str, int], ClientAccount]
    records: list[RoundRecord] = field(default_factory=list)
    server_optimizer: dict[str, dict | None] = field(default_factory=dict)  # phase -> optimizer state (distributed)
    personal_optimizer: dict[int, dict] = field(default_factory=dict)  # FedPer clients' head optimizers (distributed)
    newcomer_head: dict[str, torch.Tensor] | None = None
    after_training: dict[str, Any] | None = None
    elapsed: float = 0.0
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))
    # Seeds the clients' DP noise and Poisson sampling (privacy.noise_source run_key): drawn from the OS,
    # kept only in the checkpoint (deleted when the run ends), never in the config, ledger or result.
    noise_key: str = field(default_factory=lambda: secrets.token_hex(32))

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "global": self.global_state,
            "personal": self.personal,
            "accounts": [a.to_state() for a in self.accounts.values()],
            "records": [asdict(r) for r in self.records],
            "server_optimizer": self.server_optimizer,
            "personal_optimizer": self.personal_optimizer,
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
            newcomer_head=raw["newcomer_head"],
            after_training=raw["after_training"],
            elapsed=raw["elapsed"],
            nonce=raw["nonce"],
            noise_key=raw["noise_key"],
        )


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def public_client_seed(config: PrivferConfig, phase: str, round_index: int, client_id: int) -> int:
    """A client's training seed derived from the run seed alone: for runs without DP noise to keep secret (and
    ``privacy.noise_source: run_seed``). Deployments that train the same clients (the Flower example) use it to
    reproduce ``simulate`` exactly."""
    return _derived_seed(config.seed, 0 if phase == TRAINING else 1, round_index, client_id)


def _client_seed(config: PrivferConfig, state: "_State", phase: str, round_index: int, client_id: int) -> int:
    """The seed of one client's local training (DP noise, Poisson sampling, dropout) in one round."""
    if config.privacy.noise_source == "run_seed" or not config.privacy.enabled:  # public: nothing secret to seed
        return public_client_seed(config, phase, round_index, client_id)
    message = f"privfer/client-seed/{phase}/{round_index}/{client_id}".encode()
    digest = hmac.new(bytes.fromhex(state.noise_key), message, hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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
    mechanism = config.mechanism
    cohort_size = fed.cohort_size(mechanism, len(clients[TRAINING]))
    if cohort_size > len(clients[TRAINING]):
        raise ConfigError(
            f"federation.clients_per_round = {cohort_size} is more than the "
            f"{len(clients[TRAINING])} training clients; allowed: 2 to {len(clients[TRAINING])}"
        )
    if only_client is not None and mechanism == "distributed":
        raise ConfigError("a single node's federation (only_client) trains with privacy.mechanism 'local'; "
                          "distributed DP needs every client's share in the secure sum")
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
    every = [n for group in counts.values() for n in group.values()]
    if config.privacy.delta is not None:
        delta = config.privacy.delta
    else:  # distributed: one record of the union of all clients' records is the unit
        delta = default_delta([sum(every)] if mechanism == "distributed" else every)
    epsilon = config.privacy.epsilon if config.privacy.enabled else None
    strategy = make_strategy(fed)
    if mechanism == "distributed":
        if fed.adaptation and len(counts[ADAPTATION]) < 2:
            clients[ADAPTATION] = {}
        distributed = {
            phase: _distributed_plan(config, clips.feature_dim, counts[phase],
                                     cohort_size if phase == TRAINING else len(counts[phase]), delta,
                                     fed.rounds if phase == TRAINING else fed.adaptation_rounds)
            for phase in (TRAINING, ADAPTATION)
            if clients[phase]
        }
        return Federation(config, strategy, parts, clients, {TRAINING: {}, ADAPTATION: {}}, delta, pseudo,
                          clips.feature_dim, mechanism, distributed, cohort_size)
    common = dict(
        epsilon=epsilon,
        delta=delta,
        batch_size=config.training.batch_size,
        accountant=config.privacy.accountant,
        max_noise_multiplier=config.privacy.max_noise_multiplier,
    )
    planned = counts[TRAINING] if only_client is None else {only_client: counts[TRAINING][only_client]}
    plans = {
        TRAINING: plan_clients(planned, rounds=fed.rounds, local_epochs=fed.local_epochs, known_noise=known_noise,
                               **common),
        ADAPTATION: plan_clients(
            counts[ADAPTATION], rounds=fed.adaptation_rounds, local_epochs=fed.adaptation_epochs, **common
        )
        if len(counts[ADAPTATION]) >= 2
        else {},
    }
    if fed.adaptation and not plans[ADAPTATION]:
        clients[ADAPTATION] = {}  # fewer than two newcomers with pseudo labels: nothing to aggregate securely
    return Federation(config, strategy, parts, clients, plans, delta, pseudo, clips.feature_dim, mechanism, {},
                      cohort_size)


def _distributed_plan(config: PrivferConfig, feature_dim: int, counts: dict[int, int], clients: int, delta: float,
                      rounds: int) -> DistributedPlan:
    """The phase's calibrated distributed DP-SGD plan. Every trainable coordinate is in the sensitivity (FedPer's
    personal layers are noised locally with the same variance, so the joint release is one Skellam mechanism)."""
    template = VFER.from_config(config.model, feature_dim, private=True)
    dimension = sum(p.numel() for p in template.parameters() if p.requires_grad)
    largest = sum(sorted(counts.values(), reverse=True)[:clients])
    return calibrate_distributed(
        epsilon=config.privacy.epsilon,
        delta=delta,
        max_grad_norm=config.privacy.max_grad_norm,
        dimension=dimension,
        sample_rate=config.privacy.sample_rate,
        steps=rounds,
        clients=clients,
        records=largest,
        min_inputs_fraction=config.aggregation.min_inputs_fraction,
        colluding_fraction=config.aggregation.colluding_fraction,
        rounding_overhead=config.privacy.rounding_overhead,
        modulus_bits=config.aggregation.modulus_bits,
        max_noise_multiplier=config.privacy.max_noise_multiplier,
    )


def _schedule(config: PrivferConfig, federation: Federation) -> list[tuple[str, int]]:
    steps = [(TRAINING, r) for r in range(1, config.federation.rounds + 1)]
    if federation.clients[ADAPTATION]:
        steps += [(ADAPTATION, r) for r in range(1, config.federation.adaptation_rounds + 1)]
    return steps


def _cohort(federation: Federation, phase: str, round_index: int) -> tuple[list[int], dict[int, str]]:
    """Who trains this round and who drops out at which stage (from the run seed: the same on resume)."""
    config = federation.config
    rng = np.random.default_rng([config.seed, 0 if phase == TRAINING else 1, round_index])
    ids = sorted(federation.clients[phase])
    k = federation.cohort_size if phase == TRAINING else len(ids)
    cohort = sorted(int(c) for c in rng.choice(ids, size=k, replace=False))
    dropouts = {}
    for client in cohort:
        if rng.random() < config.federation.dropout:
            dropouts[client] = STAGES[int(rng.integers(len(STAGES)))]
    return cohort, dropouts


def _model(federation: Federation, state: dict[str, torch.Tensor]) -> VFER:
    model = VFER.from_config(federation.config.model, federation.feature_dim, private=federation.private)
    model.load_state_dict(state)
    return model


def _evaluate(federation: Federation, state: _State, clips: ClipSet, phase: str) -> dict[str, Any]:
    """Macro/micro/per-class scores on ``clips``; under FedPer each actor with its own head."""
    eval_target = federation.config.data.eval_target
    if not federation.strategy.personalized:
        predicted = predict(_model(federation, state.global_state), clips.features).argmax(axis=1)
        return classification_report(evaluation_labels(clips, eval_target), predicted)
    predicted = np.zeros(len(clips), dtype=np.int64)
    for actor in clips.actor_list():
        mask = clips.actor_ids == actor
        head = state.personal.get(actor) if phase == ADAPTATION else None
        head = head if head is not None else state.newcomer_head
        model = _model(federation, {**state.global_state, **head})
        predicted[mask] = predict(model, clips.features[mask]).argmax(axis=1)
    return classification_report(evaluation_labels(clips, eval_target), predicted)


def _noise_rng(config: PrivferConfig, state: "_State", phase: str, round_index: int, client_id: int):
    """A client's secret generator for one round (distributed DP: sampling, rounding, noise share)."""
    source = config.privacy.noise_source
    if source == "os":
        return noise_generator()
    secret = bytes.fromhex(state.noise_key) if source == "run_key" else str(config.seed).encode()
    return noise_generator(derived_key(secret, phase, round_index, client_id))


def _run_distributed_round(federation: Federation, state: _State, phase: str, round_index: int) -> RoundRecord:
    config, strategy = federation.config, federation.strategy
    fed = config.federation
    started = time.perf_counter()
    cohort, dropouts = _cohort(federation, phase, round_index)
    plan = federation.distributed[phase]
    template = _model(federation, state.global_state)
    shared = strategy.shared_names(template)
    group = federation.clients[phase]
    for client_id in cohort:
        account = state.accounts.setdefault(
            (phase, client_id), DistributedAccount(client_id, phase, group[client_id].records))
        account.record_round()
    lr = fed.server_lr if phase == TRAINING else fed.adaptation_lr

    def personal_of(client_id: int) -> dict[str, torch.Tensor]:
        head = state.personal.get(client_id)
        if head is None:
            head = state.newcomer_head if phase == ADAPTATION and state.newcomer_head is not None else {
                name: value for name, value in state.global_state.items() if name not in shared}
        return head

    def model_for(client_id: int) -> VFER:
        model = _model(federation, {**state.global_state, **personal_of(client_id)})
        model.train()
        return model

    def personal_step(client_id: int, gradients: dict[str, torch.Tensor]) -> None:
        model = _model(federation, {**state.global_state, **personal_of(client_id)})
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
        rng_for=lambda c: _noise_rng(config, state, phase, round_index, c),
        aggregation=config.aggregation,
        round_id=f"{state.nonce}:{phase}:{round_index}",
        global_state=state.global_state,
        template=template,
        server=(fed.server_optimizer, lr, fed.server_momentum),
        server_state=state.server_optimizer.get(phase),
        personal_step=personal_step if strategy.personalized else None,
    )
    state.global_state = result.global_state
    state.server_optimizer[phase] = result.server_optimizer
    val = None
    if phase == TRAINING and not strategy.personalized:
        val = _evaluate(federation, state, federation.parts["val"], phase)["macro"]["f1"]
    sent = list(result.bytes_sent.values())
    return RoundRecord(
        phase=phase, round=round_index, clients=cohort, included=result.included,
        dropouts={str(c): s for c, s in dropouts.items()}, aborted=result.aborted, train_loss=None,
        val_macro_f1=val, seconds=time.perf_counter() - started, aggregation_seconds=result.seconds_aggregation,
        bytes_per_client=float(statistics.mean(sent)) if sent else 0.0, clipped=0,
    )


def _run_round(federation: Federation, state: _State, phase: str, round_index: int) -> RoundRecord:
    if federation.mechanism == "distributed":
        return _run_distributed_round(federation, state, phase, round_index)
    config, strategy = federation.config, federation.strategy
    started = time.perf_counter()
    cohort, dropouts = _cohort(federation, phase, round_index)
    template = _model(federation, state.global_state)
    shared = strategy.shared_names(template)
    training = config.training
    lr = config.federation.local_lr if phase == TRAINING else config.federation.adaptation_lr
    epochs = config.federation.local_epochs if phase == TRAINING else config.federation.adaptation_epochs
    updates, weights, losses = {}, {}, {}
    for client_id in cohort:
        client = federation.clients[phase][client_id]
        plan = federation.plans[phase][client_id]
        account = state.accounts.setdefault(
            (phase, client_id),
            ClientAccount(client_id, phase, plan.records, plan.noise_multiplier, plan.sample_rate),
        )
        personal = state.personal.get(client_id)
        if personal is None:  # first round of this client: the initial (or newcomer) head
            personal = state.newcomer_head if phase == ADAPTATION and state.newcomer_head is not None else {
                name: value for name, value in state.global_state.items() if name not in shared
            }
        local = LocalTraining(
            lr=lr,
            epochs=epochs,
            batch_size=training.batch_size,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=config.privacy.max_grad_norm,
            accountant=config.privacy.accountant,
            noise_source=config.privacy.noise_source,
            weight_decay=training.weight_decay,
            optimizer=config.federation.local_optimizer,
        )
        seed = _client_seed(config, state, phase, round_index, client_id)
        update = client.fit(config, {**state.global_state, **personal}, shared, local,
                            history=account.history, seed=seed)
        account.record_round(update.history)
        if strategy.personalized:
            state.personal[client_id] = update.personal
        updates[client_id] = update.delta
        weights[client_id] = strategy.client_weight(update.examples)
        losses[client_id] = update.loss
    scale = max(strategy.client_weight(c.records) for c in federation.clients[phase].values())
    if federation.private:
        losses = None  # a client's loss on its clips is not DP-protected: private runs do not release it
    summed = sum_updates(updates, weights, losses, config.aggregation, dropouts=dropouts,
                         round_id=f"{state.nonce}:{phase}:{round_index}", weight_scale=scale)
    if summed.aborted is None:
        state.global_state = strategy.apply(state.global_state, summed.weighted_sum, summed.total_weight)
    val = None
    if phase == TRAINING and not strategy.personalized:
        val = _evaluate(federation, state, federation.parts["val"], phase)["macro"]["f1"]
    sent = list(summed.bytes_sent.values())
    return RoundRecord(
        phase=phase,
        round=round_index,
        clients=cohort,
        included=summed.included,
        dropouts={str(c): s for c, s in dropouts.items()},
        aborted=summed.aborted,
        train_loss=summed.loss_sum / len(summed.included) if summed.included and losses is not None else None,
        val_macro_f1=val,
        seconds=time.perf_counter() - started,
        aggregation_seconds=summed.seconds,
        bytes_per_client=float(statistics.mean(sent)) if sent else 0.0,
        clipped=summed.clipped,
    )


def _newcomer_head(federation: Federation, state: _State) -> dict[str, torch.Tensor] | None:
    """FedPer: the securely summed, example-weighted mean of the trained clients' personal heads."""
    if not federation.strategy.personalized:
        return None
    trained = sorted(c for c in state.personal if (TRAINING, c) in state.accounts)
    heads = {c: state.personal[c] for c in trained}
    weights = {c: federation.clients[TRAINING][c].records for c in trained}
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


def simulate(
    config: PrivferConfig,
    run_dir: Path | None = None,
    *,
    clips: ClipSet | None = None,
    on_start: Callable[[Federation, int, int], None] | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> dict[str, Any]:
    """Run the federation; with ``run_dir`` write checkpoints, rounds, the ledger and result.json there."""
    started = time.perf_counter()
    if config.training.torch_threads is not None:
        torch.set_num_threads(config.training.torch_threads)
    federation = prepare_federation(config, clips)
    prepared_seconds = time.perf_counter() - started
    resumed = prepare_run_dir(run_dir, config) if run_dir is not None else False
    if resumed and (run_dir / RESULT).exists():
        return json.loads((run_dir / RESULT).read_text(encoding="utf-8"))

    torch.manual_seed(config.seed)
    initial = VFER.from_config(config.model, federation.feature_dim, private=federation.private)
    state = _State(global_state={k: v.detach().clone() for k, v in initial.state_dict().items()}, personal={},
                   accounts={})
    checkpoint = run_dir / CHECKPOINT if run_dir is not None else None
    if resumed and checkpoint is not None and checkpoint.exists():
        try:
            state = _State.from_checkpoint(torch.load(checkpoint, map_location="cpu", weights_only=True))
        except Exception as exc:  # torch raises many types for a damaged file
            raise RunDirectoryError(
                f"{checkpoint} cannot be read ({exc.__class__.__name__}); delete it to restart the run"
            ) from None
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
            atomic_torch_save(checkpoint, state.to_checkpoint())
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
        atomic_write_json(run_dir / RESULT, result)
        checkpoint.unlink(missing_ok=True)  # the result supersedes it
    return result


def _finish_training_phase(federation: Federation, state: _State) -> None:
    state.newcomer_head = _newcomer_head(federation, state)
    state.after_training = _evaluate(federation, state, federation.parts["test_eval"], TRAINING)


def _ledger(federation: Federation, state: _State) -> dict[str, Any]:
    config = federation.config
    not_covered = (
        ["the IFER that pseudo-labels phase 2 is fitted on the training actors' frames without DP (it stands "
         "in for a public pretrained model); set model.ifer_weights to use one"]
        if federation.clients[ADAPTATION] and config.model.ifer_weights is None
        else []
    )
    max_rounds = {TRAINING: config.federation.rounds, ADAPTATION: config.federation.adaptation_rounds}
    if federation.mechanism == "distributed":
        return build_distributed_ledger(
            list(state.accounts.values()), federation.distributed, noise_source=config.privacy.noise_source,
            max_rounds=max_rounds, not_covered=not_covered)
    return build_ledger(
        list(state.accounts.values()),
        target_epsilon=config.privacy.epsilon if federation.private else None,
        delta=federation.delta,
        accountant=config.privacy.accountant,
        max_grad_norm=config.privacy.max_grad_norm,
        noise_source=config.privacy.noise_source,
        max_rounds=max_rounds,
        not_covered=not_covered,
    )


def _result(federation: Federation, state: _State, final: dict, adapted: bool, ledger: dict, prepared_seconds: float):
    config = federation.config
    sigmas = [p.noise_multiplier for plans in federation.plans.values() for p in plans.values()
              if p.noise_multiplier is not None]
    sigmas += [plan.noise_multiplier for plan in federation.distributed.values()]
    records = state.records
    return {
        "command": "simulate",
        "strategy": config.federation.strategy,
        "aggregator": config.aggregation.backend,
        "aggregator_private": config.aggregation.backend != "plain",
        "private": federation.private,
        "test": final,
        "test_after_training": state.after_training,
        "test_after_adaptation": final if adapted else None,
        "privacy": {
            "unit": "record",
            "mechanism": federation.mechanism,
            "target_epsilon": config.privacy.epsilon if federation.private else None,
            "delta": federation.delta,
            "accountant": ledger["accountant"],
            "epsilon_max": ledger["epsilon_max"],
            "epsilon_median": ledger["epsilon_median"],
            "noise_multiplier_min": min(sigmas) if sigmas else None,
            "noise_multiplier_max": max(sigmas) if sigmas else None,
        },
        "rounds": {
            "training": sum(r.phase == TRAINING for r in records),
            "adaptation": sum(r.phase == ADAPTATION for r in records),
            "aborted": sum(r.aborted is not None for r in records),
        },
        "clients": {phase: len(group) for phase, group in federation.clients.items()},
        "pseudo_labels": federation.pseudo,
        "secure_aggregation": {
            "seconds": sum(r.aggregation_seconds for r in records),
            "bytes_per_client_mean": statistics.mean(r.bytes_per_client for r in records) if records else 0.0,
            "clipped_values": sum(r.clipped for r in records),
        },
        "data": {
            "source": config.data.source,
            "train_clips": len(federation.parts["train"]),
            "test_eval_clips": len(federation.parts["test_eval"]),
        },
        "seconds": state.elapsed + prepared_seconds,  # rounds of every invocation + this one's preparation
    }


__all__ = ["Federation", "RoundRecord", "prepare_federation", "simulate"]
