"""What the ServerApp and the ClientApp share: the privfer config of the run, the data, the initial model.

Every process builds the same federation from the run config (the synthetic
data set and the actor split are seeded), so a SuperNode needs no data
shipped: it trains the actor its ``partition-id`` names. With real CREMA-D,
point ``privfer-set`` at a local folder (``data.source=cremad data.root=...``)
that each node holds.
"""

from __future__ import annotations

import functools
import shlex
from typing import Any, Mapping

import numpy as np
import torch
from flwr.common import Array, ArrayRecord

from privfer.centralized import split_clips
from privfer.config import PrivferConfig, load_config
from privfer.data import load_clips
from privfer.data.splits import split_actors
from privfer.fl.simulation import TRAINING, Federation, prepare_federation
from privfer.fl.strategies import make_strategy
from privfer.models.vfer import VFER


def privfer_config(run_config: Mapping[str, Any]) -> PrivferConfig:
    """The privfer config of this Flower run: a YAML, ``--set`` style overrides, and the run's own keys."""
    epsilon = str(run_config.get("epsilon", "3")).strip().lower()
    # Flower's strategy samples the nodes (fraction-train): privfer's own sampling setting is unused here and set to
    # its minimum, so that any population passes validation.
    # The nodes run local DP-SGD (each adds its full noise); distributed DP in Flower nodes is not built yet.
    overrides = ["federation.clients_per_round=2", "privacy.mechanism=local",
                 *shlex.split(str(run_config.get("privfer-set", "")))]
    overrides += [
        f"privacy.epsilon={'null' if epsilon in ('inf', 'none', '') else float(epsilon)}",
        f"federation.strategy={run_config.get('strategy', 'fedavg')}",
        f"federation.rounds={int(run_config.get('num-server-rounds', 3))}",
        "federation.adaptation=false",  # the held-out actors' adaptation phase is privfer simulate's
    ]
    path = str(run_config.get("privfer-config", "")) or None
    return load_config(path, overrides)


@functools.lru_cache(maxsize=1)
def _clips(key: tuple):
    return load_clips(privfer_config(dict(key)).data)


@functools.lru_cache(maxsize=256)  # a SuperNode's process holds one node; an in-process run holds them all
def _federation(key: tuple, partition: int | None, known_noise: float | None) -> Federation:
    config = privfer_config(dict(key))
    clips = _clips(key)
    if partition is None:  # the server never trains: no noise to calibrate (each node calibrates its own)
        public = config.model_copy(update={"privacy": config.privacy.model_copy(update={"epsilon": None})})
        return prepare_federation(public, clips)
    actors = sorted(split_clips(clips, split_actors(clips, config.data.split, config.seed))["train"].actor_list())
    if not 0 <= partition < len(actors):
        raise ValueError(f"partition-id {partition} is outside 0..{len(actors) - 1} (the run has {len(actors)} "
                         "training actors)")
    actor = actors[partition]
    known = None if known_noise is None else {actor: known_noise}
    return prepare_federation(config, clips, only_client=actor, known_noise=known)  # this node's noise only


def server_federation(run_config: Mapping[str, Any]) -> tuple[Federation, PrivferConfig]:
    """The server's view — data split, test actors, delta, strategy — and the run's config (with its budget)."""
    key = tuple(sorted(run_config.items()))
    return _federation(key, None, None), privfer_config(dict(key))


def node_federation(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any], known_noise: float | None = None
) -> tuple[Federation, int]:
    """A node's view: the federation with only its own plan, and the training actor its ``partition-id`` names.

    ``known_noise``: the node's noise multiplier from an earlier round (checked, not searched again: the search
    takes seconds, and a SuperNode starts a fresh process for every message).
    """
    if "partition-id" not in node_config:
        raise ValueError('this ClientApp needs a node config with "partition-id" (flower-supernode --node-config)')
    fed = _federation(tuple(sorted(run_config.items())), int(node_config["partition-id"]), known_noise)
    (actor,) = fed.plans[TRAINING]
    return fed, actor


def initial_state(config: PrivferConfig, feature_dim: int) -> dict[str, torch.Tensor]:
    """The initial VFER parameters: the same on the server and on every node (seeded), as privfer simulate's."""
    torch.manual_seed(config.seed)
    model = VFER.from_config(config.model, feature_dim, private=config.privacy.enabled)
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def shared_names(config: PrivferConfig, feature_dim: int) -> list[str]:
    """The parameters that are aggregated (FedPer keeps the others on the node)."""
    model = VFER.from_config(config.model, feature_dim, private=config.privacy.enabled)
    return make_strategy(config.federation).shared_names(model)


def to_record(state: Mapping[str, torch.Tensor], names: list[str]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(state[name].numpy())) for name in names})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.array(array.numpy())) for name, array in record.items()}
