"""The federated strategies, by name: the registry ``federation.strategy`` is read against.

A new strategy is one file defining a :class:`~privfer.fl.strategies.base.Strategy`
subclass (its options, what it shares, what it adds to local training) and one
line in :data:`_MODULES`; nothing else in privfer names it. The config holds
only the name and the options (``federation.strategy_options``);
:func:`make_strategy` checks both and says what is allowed.
"""

from __future__ import annotations

import importlib

from privfer.config import FederationConfig
from privfer.config.sections import validated_options
from privfer.errors import ConfigError
from privfer.fl.strategies.base import ClientData, LocalStep, NoOptions, Strategy

_MODULES = (  # one line per strategy
    "fedavg",
    "fedper",
    "fedprox",
    "amy",
    "clip_agreement",
)

STRATEGIES: dict[str, type[Strategy]] = {}
for _module in _MODULES:
    _loaded = importlib.import_module(f"{__name__}.{_module}")
    for _name in _loaded.__all__:
        _cls = getattr(_loaded, _name)
        STRATEGIES[_cls.name] = _cls


def names() -> list[str]:
    return list(STRATEGIES)


def make_strategy(config: FederationConfig) -> Strategy:
    """The strategy ``config.strategy`` names, with its options checked (ConfigError naming the field otherwise)."""
    cls = STRATEGIES.get(config.strategy)
    if cls is None:
        raise ConfigError(f"federation.strategy = {config.strategy!r}: allowed: {', '.join(STRATEGIES)}")
    try:
        options = validated_options(cls.Options, config.strategy_options, "federation.strategy_options", cls.title)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    strategy = cls.from_config(config, options)
    strategy.federation = config
    return strategy


FedAvg = STRATEGIES["fedavg"]
FedPer = STRATEGIES["fedper"]

__all__ = ["ClientData", "FedAvg", "FedPer", "LocalStep", "NoOptions", "STRATEGIES", "Strategy", "make_strategy", "names"]
