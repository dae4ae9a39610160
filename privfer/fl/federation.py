"""A federation, prepared before any round runs, and the state a run carries from round to round.

:func:`prepare_federation` loads the data, splits the actors, builds the
clients and calibrates the mechanism's noise (every mistake in the config is
raised here, before the run directory is touched). :class:`RunState` is what
the rounds change and the checkpoint keeps.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from privfer.config import PrivferConfig
from privfer.data import load_clips
from privfer.data.clips import ClipSet
from privfer.data.labels import pseudo_labels, training_targets
from privfer.data.splits import split_run
from privfer.errors import ConfigError
from privfer.evaluation import pseudo_label_report
from privfer.fl.client import FLClient
from privfer.fl.mechanisms import Mechanism, make_mechanism
from privfer.fl.rounds import ADAPTATION, TRAINING, RoundRecord, draw_cohort
from privfer.fl.strategies import Strategy, make_strategy
from privfer.fl.strategies.base import check_client_data_signature, check_per_clip, check_portable, checked_client_data
from privfer.models.vfer import VFER, ifer_from_config
from privfer.privacy.ledger import ClientAccount, account_from_state


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
    def plans_sha256(self) -> str:
        """The digest of the calibrated plans (what a checkpoint is held to on resume)."""
        described = {str(key): plan.to_dict() if hasattr(plan, "to_dict") else repr(plan)
                     for key, plan in self.plans.items()}
        return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def plans(self) -> dict[str, Any]:
        """The mechanism's calibrated plans per phase (local: per client; distributed: one per phase)."""
        return self.mechanism.plans

    def model(self, state: dict[str, torch.Tensor]) -> VFER:
        model = VFER.from_config(self.config.model, self.feature_dim, private=self.private)
        model.load_state_dict(state)
        return model

    def client(self, state: "RunState", phase: str, client_id: int, shared: list[str]) -> FLClient:
        """Client ``client_id`` as it trains this round: its clips with the targets and weights the strategy gives
        them (:meth:`~privfer.fl.strategies.Strategy.client_data`, checked), its per-client state updated."""
        client = self.clients[phase][client_id]
        strategy = self.strategy
        if not strategy.gives_client_data:
            return client

        def model() -> VFER:
            return self.model({**state.global_state, **state.personal_of(client_id, phase, shared)})

        # copies: the strategy cannot change the client's clips or labels in place, past the checks
        round_index = sum(1 for record in state.records if record.phase == phase)  # the rounds of the phase so far
        data, kept = strategy.client_data(phase, client_id, client.features.clone(), client.targets.clone(), model,
                                          state.strategy_clients.get(client_id), round_index=round_index)
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
class RunState:
    """What a run carries from round to round (all of it in the checkpoint): the global model, the clients' personal
    parameters and accounts, the strategy's state (on the server, per phase: its optimizer's under distributed DP;
    on each client: what :meth:`~privfer.fl.strategies.Strategy.client_data` keeps) and the mechanism's own
    (``mechanism_state``: whatever a mechanism carries between rounds; distributed DP with personal layers: each
    client's head optimizer). Checkpointed state is tensors, numbers, strings, lists and dicts (the checkpoint
    loads with ``weights_only``)."""

    global_state: dict[str, torch.Tensor]
    personal: dict[int, dict[str, torch.Tensor]]
    accounts: dict[tuple[str, int], ClientAccount]
    records: list[RoundRecord] = field(default_factory=list)
    strategy_server: dict[str, Any] = field(default_factory=dict)  # phase -> the strategy's server (optimizer) state
    strategy_clients: dict[int, Any] = field(default_factory=dict)  # the strategy's per-client state (client_data)
    mechanism_state: dict[str, Any] = field(default_factory=dict)  # the mechanism's round-to-round state
    newcomer_head: dict[str, torch.Tensor] | None = None
    after_training: dict[str, Any] | None = None
    # runs without DP: the training round with the best validation macro F1 so far ("round", "val_macro_f1",
    # "global"), whose model the training phase ends with; ``selecting`` False: a run resumed from a checkpoint
    # written before privfer kept it, whose earlier rounds it cannot choose from (it keeps its last round)
    best: dict[str, Any] | None = None
    selecting: bool = True
    elapsed: float = 0.0
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))
    # Seeds the clients' DP noise and Poisson sampling (privacy.noise_source run_key): drawn from the OS,
    # kept only in the checkpoint (deleted when the run ends), never in the config, ledger or result.
    noise_key: str = field(default_factory=lambda: secrets.token_hex(32))
    # The SHA-256 of the plans the run was calibrated with: a resume under other plans (another privfer, whose
    # calibration changed) would account rounds noised for one plan as if for another, so it is refused.
    plans_sha256: str | None = None
    # torch's global generator as the last checkpoint left it (dropout masks draw from it): a round killed after its
    # release runs again with the same masks, or the two releases' difference would be noise-free (review, issue 26)
    torch_rng: torch.Tensor | None = None

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
            "strategy_server": self.strategy_server,
            "strategy_clients": self.strategy_clients,
            "mechanism_state": self.mechanism_state,
            "newcomer_head": self.newcomer_head,
            "after_training": self.after_training,
            "best": self.best,
            "selecting": self.selecting,
            "elapsed": self.elapsed,
            "nonce": self.nonce,
            "noise_key": self.noise_key,
            "plans_sha256": self.plans_sha256,
            "torch_rng": self.torch_rng,
        }

    @classmethod
    def from_checkpoint(cls, raw: dict[str, Any]) -> "RunState":
        accounts = [account_from_state(a) for a in raw["accounts"]]
        return cls(
            global_state=raw["global"],
            personal={int(k): v for k, v in raw["personal"].items()},
            accounts={(a.phase, a.client): a for a in accounts},
            records=[RoundRecord(**r) for r in raw["records"]],
            strategy_server=raw.get("strategy_server", raw.get("server_optimizer", {})),
            strategy_clients={int(k): v for k, v in raw.get("strategy_clients", {}).items()},
            mechanism_state=raw.get("mechanism_state", _legacy_mechanism_state(raw)),
            newcomer_head=raw["newcomer_head"],
            after_training=raw["after_training"],
            best=raw.get("best"),  # absent: a checkpoint written before runs without DP kept their best round
            selecting=bool(raw.get("selecting", not raw["records"])),
            elapsed=raw["elapsed"],
            nonce=raw["nonce"],
            noise_key=raw["noise_key"],
            plans_sha256=raw.get("plans_sha256"),  # absent: a checkpoint written before the field existed
            torch_rng=raw.get("torch_rng"),  # absent: likewise
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
    try:
        check_per_clip(strategy, TRAINING)
        check_client_data_signature(strategy)
    except ValueError as exc:
        raise ConfigError(f"federation.strategy: {exc}") from None
    if strategy.couples_records and mechanism.privacy is not None and mechanism.privacy.unit == "record":
        raise ConfigError(f"federation.strategy '{strategy.name}' makes a clip's target depend on the client's other "
                          f"clips, which record-level DP does not bound ({mechanism.title} clips each record's "
                          "gradient alone); use privacy.unit 'person', or another strategy")
    if not strategy.one_global_model and config.privacy.unit == "person" and config.algorithm == "distributed":
        raise ConfigError(f"federation.strategy '{strategy.name}' keeps personal layers, which privacy.unit 'person' "
                          "does not build on the distributed line (the newcomers' head and the personal heads' scores "
                          "would be released without noise); share the whole model or use privacy.unit 'record'")
    clips = load_clips(config.data) if clips is None else clips
    if fed.server_lr is None:  # the step's rule needed the feature dimension, known only now (CREMA-D)
        config = config.model_copy(deep=True)
        config.federation.server_lr = config.resolved_server_lr(clips.feature_dim)
        fed = config.federation
        strategy = make_strategy(fed)
    split, parts = split_run(clips, config.data, config.seed)
    temperature = config.data.partial_label_temperature
    train = parts["train"]
    targets = training_targets(train, config.training.labels, temperature)
    clients: dict[str, dict[int, FLClient]] = {TRAINING: {}, ADAPTATION: {}}
    for actor in train.actor_list():
        mask = train.actor_ids == actor
        clients[TRAINING][actor] = FLClient(actor, train.features[mask], targets[mask])
    cohort_size = fed.cohort_size(config.algorithm, len(clients[TRAINING]))
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
    with torch.random.fork_rng(devices=[]):  # a template to check names against; the run's generator is untouched
        template = VFER.from_config(config.model, clips.feature_dim, private=config.privacy.enabled)
    try:  # what the strategy keeps personal fits this model, and it can serve every client, before anything runs
        strategy.personal_names(template)
        for client_id, client in clients[TRAINING].items():  # client_data refines the training phase's clients
            if only_client is None or client_id == only_client:
                strategy.check_client(client.records)
    except ValueError as exc:
        raise ConfigError(f"federation.strategy '{strategy.name}': {exc}") from None
    counts = {phase: {c: client.records for c, client in group.items()} for phase, group in clients.items()}
    delta = config.privacy.delta if config.privacy.delta is not None else mechanism.default_delta(counts)
    mechanism.check_delta(delta, counts)
    runnable = mechanism.calibrate(counts, feature_dim=clips.feature_dim, cohort_size=cohort_size, delta=delta,
                                   only_client=only_client, known_noise=known_noise)
    if ADAPTATION not in runnable:
        clients[ADAPTATION] = {}  # fewer than two newcomers with pseudo labels: nothing to aggregate securely
    return Federation(config, strategy, mechanism, parts, clients, delta, pseudo, clips.feature_dim,
                      cohort_size)


def _legacy_mechanism_state(raw: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint written before the mechanism kept its own state: the distributed heads' optimizers."""
    personal = raw.get("personal_optimizer") or {}
    return {"personal_optimizer": {int(k): v for k, v in personal.items()}} if personal else {}


__all__ = ["Federation", "RunState", "prepare_federation"]
