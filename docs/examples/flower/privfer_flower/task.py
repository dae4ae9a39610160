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

from privfer.config import PrivferConfig, load_config
from privfer.data import load_clips
from privfer.data.splits import split_actors, split_clips
from privfer.fl.simulation import TRAINING, Federation, prepare_federation
from privfer.fl.strategies import make_strategy
from privfer.models.vfer import VFER


def privfer_config(run_config: Mapping[str, Any]) -> PrivferConfig:
    """The privfer config of this Flower run: a YAML, ``--set`` style overrides, and the run's own keys."""
    epsilon = str(run_config.get("epsilon", "3")).strip().lower()
    free = epsilon in ("inf", "none", "")  # no budget
    # Flower's strategy samples the nodes (fraction-train): privfer's own sampling setting is unused here and set to
    # its minimum, so that any population passes validation.
    # distributed (the default): person-level DP, each node adds its own noise share inside secagg_mod;
    # local: each node runs DP-SGD with Opacus and adds all its noise itself (record level).
    # Without a budget the nodes train by local epochs (FedAvg over the secure sum): the local line's run without DP.
    # privfer simulate's distributed line without DP (clipped sums or clipped updates, the server's Adam, no noise)
    # is not what this app runs.
    mechanism = mechanism_of(run_config)
    unit = ["privacy.unit=person"] if mechanism == "distributed" else []
    overrides = ["federation.clients_per_round=2", f"privacy.mechanism={'local' if free else mechanism}", *unit,
                 *shlex.split(str(run_config.get("privfer-set", "")))]
    overrides += [
        f"privacy.epsilon={'null' if free else float(epsilon)}",
        f"federation.strategy={run_config.get('strategy', 'fedavg')}",
        f"federation.rounds={int(run_config.get('num-server-rounds', 3))}",
        "federation.adaptation=false",  # the held-out actors' adaptation phase is privfer simulate's
    ]
    path = str(run_config.get("privfer-config", "")) or None
    return load_config(path, overrides)


MECHANISMS = ("distributed", "local")
DEFAULT_DELTA = 1e-5  # person level: below 1 / persons for federations of up to 10^4 people


def mechanism_of(run_config: Mapping[str, Any]) -> str:
    mechanism = str(run_config.get("mechanism", "distributed"))
    if mechanism not in MECHANISMS:
        raise ValueError(f"run config 'mechanism' must be one of {MECHANISMS}, got {mechanism!r}")
    return mechanism


def is_distributed(run_config: Mapping[str, Any]) -> bool:
    """Person-level distributed DP: a private run whose mechanism is distributed (the noise added by secagg_mod)."""
    return mechanism_of(run_config) == "distributed" and privfer_config(run_config).privacy.enabled


@functools.lru_cache(maxsize=1)
def _clips(key: tuple):
    return load_clips(privfer_config(dict(key)).data)


@functools.lru_cache(maxsize=256)  # a SuperNode's process holds one node; an in-process run holds them all
def _federation(key: tuple, partition: int | None, known_noise: float | None) -> Federation:
    config = privfer_config(dict(key))
    if make_strategy(config.federation).gives_client_data:  # this app trains on the clients' own labels
        raise ValueError(f"strategy {config.federation.strategy!r} refines its clients' labels (client_data); this "
                         "example trains on the clients' own labels: run it with privfer simulate")
    clips = _clips(key)
    if partition is None:  # the server never trains: no noise to calibrate (each node calibrates its own)
        return prepare_federation(_without_noise(config), clips)
    actors = sorted(split_clips(clips, split_actors(clips, config.data.split, config.seed))["train"].actor_list())
    if not 0 <= partition < len(actors):
        raise ValueError(f"partition-id {partition} is outside 0..{len(actors) - 1} (the run has {len(actors)} "
                         "training actors)")
    actor = actors[partition]
    if is_distributed(dict(key)):  # the node trains without per-record noise; secagg_mod adds its share
        return prepare_federation(_without_noise(config), clips, only_client=actor)
    known = None if known_noise is None else {actor: known_noise}
    return prepare_federation(config, clips, only_client=actor, known_noise=known)  # this node's noise only


def _without_noise(config: PrivferConfig) -> PrivferConfig:
    """The run's config (its model and settings as resolved) for a federation that draws no DP noise: the local
    line without DP, whose clients train by local epochs — as this app's nodes do."""
    return config.model_copy(update={"privacy": config.privacy.model_copy(update={"epsilon": None,
                                                                                  "mechanism": "local"})})


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


def node_privacy(context: Any) -> Any:
    """The node's own privacy policy, from its node config ONLY (the run config comes from the server's side):
    ``ledger`` (an absolute path on the node's disk), ``lifetime-epsilon`` (required with it), ``delta`` (default
    1e-5), ``colluding-fraction`` (0.1), ``min-inputs-fraction`` (0.9) and ``min-colluders`` (0: the colluders or
    sybils it assumes in any round, whatever its size). A node with a ledger takes part only in
    distributed-DP rounds whose plan it accepts; a node without one refuses them (it would add no noise)."""
    from pathlib import Path

    from privfer.integrations.flower import NodePrivacy

    node_config = context.node_config
    if "ledger" not in node_config:
        return None
    if "lifetime-epsilon" not in node_config:
        raise PermissionError('a node with a "ledger" needs its own "lifetime-epsilon" in its node config')
    return NodePrivacy(
        ledger=Path(str(node_config["ledger"])),
        lifetime_epsilon=float(node_config["lifetime-epsilon"]),
        delta=float(node_config.get("delta", DEFAULT_DELTA)),
        colluding_fraction=float(node_config.get("colluding-fraction", 0.1)),
        min_inputs_fraction=float(node_config.get("min-inputs-fraction", 0.9)),
        min_colluders=int(node_config.get("min-colluders", 0)),
    )


def server_dp(run_config: Mapping[str, Any]) -> Any:
    """The server's person-level plan maker under distributed DP (None otherwise)."""
    from privfer.integrations.flower import DistributedDP

    if not is_distributed(run_config):
        return None
    config = privfer_config(run_config)
    return DistributedDP(
        epsilon=float(config.privacy.epsilon), rounds=int(run_config.get("num-server-rounds", 3)),
        delta=float(run_config.get("delta", DEFAULT_DELTA)), max_update_norm=config.privacy.max_update_norm,
        participation=config.privacy.participation, colluding_fraction=config.aggregation.colluding_fraction,
        min_inputs_fraction=config.aggregation.min_inputs_fraction,
        min_colluders=int(run_config.get("min-colluders", 0)),
    )


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
