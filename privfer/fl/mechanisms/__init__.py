"""A federation's privacy mechanism behind one interface: calibration, the round, the ledger, what it promises.

The simulation (and a deployment node built on :func:`privfer.fl.simulation.prepare_federation`)
asks the mechanism, and nothing else, how private the run is:

* :meth:`Mechanism.calibrate` sizes the noise before the run directory is
  touched (every impossible budget is an error here);
* :meth:`Mechanism.run_round`, the one round driver, runs one round — the
  clients' private contributions through the configured aggregation backend
  (each mechanism's :meth:`Mechanism.release`), then the strategy's server step
  on what was released — and returns the round's
  :class:`~privfer.fl.rounds.RoundRecord`;
* :meth:`Mechanism.ledger` writes the privacy ledger, whose ``mechanism_id``
  selects the auditor in :mod:`privfer.privacy.audit` (``KINDS``);
* :meth:`Mechanism.describe` states the promise before the run starts.

Mechanisms: :class:`NoDP` (no noise; the ledger says so), :class:`LocalDPSGD`
(each client runs DP-SGD with its full noise, as if the server saw its update)
and :class:`DistributedDPSGD` (one DP-SGD step per secure sum, the noise split
into shares that only add up to the calibrated variance inside the sum) protect
a record; :class:`DistributedDPFedAvg` protects a person (each client's clipped
whole update, or zeros by its secret coin, with a noise share in the sum). The
strategy (:mod:`privfer.fl.strategies`) decides which parameters are shared;
the mechanism decides how what is shared is made private.

One file per trainer module (``local.py``, ``distributed.py``, ``distributed_person.py``), registered by one line
in ``_MODULES``; each trainer names the registered facts it trains (``privacy = ...``,
:mod:`privfer.privacy.mechanisms`) and reads its id, title and unit from them. ``base.py``: the interface and what
the trainers share.
"""

from __future__ import annotations

import importlib

from privfer.config import PrivferConfig
from privfer.errors import ConfigError
from privfer.fl.mechanisms.base import (Counts, Mechanism, Release, client_seed, local_training, noised_dimension,
                                        public_client_seed)
from privfer.fl.mechanisms.distributed import DistributedDPSGD, NoiselessSGD
from privfer.fl.mechanisms.distributed_person import DistributedDPFedAvg, NoiselessFedAvg
from privfer.fl.mechanisms.local import LocalDPSGD, NoDP

_MODULES = (  # one line per trainer module; each lists its trainers in TRAINERS
    "local",
    "distributed",
    "distributed_person",
)

# the trainer of each registered privacy mechanism, by its id (None: no DP)
MECHANISMS: dict[str | None, type[Mechanism]] = {}
for _module in _MODULES:
    for _trainer in importlib.import_module(f"{__name__}.{_module}").TRAINERS:
        if _trainer.id in MECHANISMS:
            raise RuntimeError(f"two trainers claim the mechanism id {_trainer.id!r}")
        MECHANISMS[_trainer.id] = _trainer


def make_mechanism(config: PrivferConfig) -> Mechanism:
    """The trainer of the mechanism the (validated) config resolves to; a run without DP on the distributed line
    trains with its algorithm without noise (:attr:`privfer.config.PrivferConfig.algorithm`)."""
    if config.mechanism_id is None and config.algorithm == "distributed":
        return NoiselessFedAvg(config) if config.privacy.unit == "person" else NoiselessSGD(config)
    trainer = MECHANISMS.get(config.mechanism_id)
    if trainer is None:
        raise ConfigError(f"the privacy mechanism {config.mechanism_id!r} is registered (privfer.privacy.mechanisms) "
                          f"but has no trainer in privfer.fl.mechanisms; trained: {sorted(map(str, MECHANISMS))}")
    return trainer(config)


__all__ = ["MECHANISMS", "Counts", "DistributedDPFedAvg", "DistributedDPSGD", "LocalDPSGD", "Mechanism", "NoDP",
           "NoiselessFedAvg", "NoiselessSGD", "Release", "client_seed", "local_training", "make_mechanism",
           "noised_dimension", "public_client_seed"]
