"""The registry of aggregation backends: each is one module with a config class, a recipe and a round-config
factory, registered by one entry here.

A backend module provides:

* its config class (a frozen pydantic model whose ``backend`` field names it on the wire of configs);
* ``aggregate(updates, config, dropouts=None, *, example_counts, metrics, round_id, **options)``: one whole round
  in process, returning an :class:`~privfer.secagg.rounds.AggregationResult` (every backend returns the same
  type, so callers never branch on the backend);
* ``round_config(num_clients, metrics, *, integer_sum_bound, min_inputs, settings)``: the config of one round from
  a run's aggregation settings (privfer's ``AggregationConfig`` as a mapping, its ``auto`` values resolved).

Modules are imported when first used (CKKS brings TenSEAL), so this registry costs nothing to import.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from privfer.secagg.rounds import AggregationResult


@dataclass(frozen=True)
class Backend:
    """One aggregation backend's facts and where its code lives."""

    name: str  # aggregation.backend
    module: str  # the module holding its recipe (aggregate) and round_config
    config_class: str  # its config class, in ``config_module``
    config_module: str
    private: bool  # the server learns only the sum
    exact_integers: bool  # sums already-encoded integers exactly (what the noise shares of distributed DP need)
    options: tuple[str, ...] = ()  # the recipe's keyword arguments beyond the common ones

    def recipe(self) -> Callable[..., AggregationResult]:
        return importlib.import_module(self.module).aggregate

    def round_config(self, num_clients: int, metrics: tuple[str, ...] = (), *, integer_sum_bound: int | None = None,
                     min_inputs: int | None = None, settings: Mapping[str, Any]) -> Any:
        """The config of one round (ConfigError when the backend cannot run it)."""
        factory = importlib.import_module(self.module).round_config
        return factory(num_clients, tuple(metrics), integer_sum_bound=integer_sum_bound, min_inputs=min_inputs,
                       settings=settings)


BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (  # one entry per backend
    Backend("masking", "privfer.secagg.masking", "SecAggConfig", "privfer.secagg.config", private=True,
            exact_integers=True, options=("randomness", "enrollments", "context", "processes")),
    Backend("ckks", "privfer.secagg.he.recipe", "CKKSConfig", "privfer.secagg.he.config", private=True,
            exact_integers=False, options=("enrollments",)),
    Backend("plain", "privfer.secagg.plain", "PlainConfig", "privfer.secagg.plain", private=False,
            exact_integers=True),
)}


def backend_named(name: str) -> Backend:
    """The backend registered as ``name`` (ValueError naming the registered ones)."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation backend {name!r}; registered: {', '.join(BACKENDS)}") from None


def backend_of(config: object) -> Backend:
    """The backend whose config class ``config`` is an instance of (TypeError otherwise). Nothing is imported: a
    config's class is loaded already."""
    for backend in BACKENDS.values():
        module = sys.modules.get(backend.config_module)
        if module is not None and isinstance(config, getattr(module, backend.config_class)):
            return backend
    known = ", ".join(backend.config_class for backend in BACKENDS.values())
    raise TypeError(f"config must be one of the backends' configs ({known}), got {type(config).__name__}")


__all__ = ["BACKENDS", "Backend", "backend_named", "backend_of"]
