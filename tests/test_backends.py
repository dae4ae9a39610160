"""The aggregation-backend seam (privfer/secagg/backends.py): one registry, one recipe signature, one result type."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict

from privfer.config import load_config
from privfer.secagg import BACKENDS, AggregationResult, aggregate
from privfer.secagg.backends import Backend, backend_named, backend_of

UPDATES = {c: [np.full((2, 3), 0.25 * c), np.arange(4.0) / c] for c in range(1, 6)}


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_sums_through_aggregate_and_its_round_config(name):
    config = load_config(None, [f"aggregation.backend={name}"]).aggregation.round_config(len(UPDATES))
    assert backend_of(config) is BACKENDS[name]
    result = aggregate(UPDATES, config, dropouts={5: "masked_input"})
    assert isinstance(result, AggregationResult) and sorted(result.included) == [1, 2, 3, 4]
    expected = [sum(UPDATES[c][i] for c in range(1, 5)) for i in range(2)]
    for got, want in zip(result.total, expected):
        np.testing.assert_allclose(got, want, atol=result.error_bound + 1e-9)


def test_integer_sums_go_only_to_backends_that_sum_integers_exactly():
    from privfer.errors import ConfigError

    for name, backend in BACKENDS.items():
        aggregation = load_config(None, [f"aggregation.backend={name}"]).aggregation
        if backend.exact_integers:
            config = aggregation.round_config(5, integer_sum_bound=1000, min_inputs=4)
            assert config.encoding == "integer"
        else:
            with pytest.raises(ConfigError, match="cannot sum integer contributions exactly"):
                aggregation.round_config(5, integer_sum_bound=1000, min_inputs=4)


def test_a_new_backend_is_one_module_and_one_registry_entry(monkeypatch):
    """Registered by one entry, a backend module's recipe runs behind aggregate() with the common arguments and
    only the options it declares."""
    module = types.ModuleType("privfer_test_backend")

    class EchoConfig(BaseModel):
        model_config = ConfigDict(frozen=True)
        num_clients: int

    seen = {}

    def recipe(updates, config, dropouts=None, *, example_counts=None, metrics=None, round_id=None, **options):
        seen.update(options=options, clients=sorted(updates), dropouts=dropouts)
        total = [sum(updates[c][i] for c in updates) for i in range(len(next(iter(updates.values()))))]
        return AggregationResult(total=total, included=sorted(updates), example_count=len(updates), metrics={},
                                 clipping=None, error_bound=0.0, transcript=None, words=None, times=None,
                                 bytes_sent={})

    module.EchoConfig, module.aggregate = EchoConfig, recipe
    module.round_config = lambda num_clients, metrics, **_: EchoConfig(num_clients=num_clients)
    monkeypatch.setitem(sys.modules, "privfer_test_backend", module)
    monkeypatch.setitem(BACKENDS, "echo", Backend("echo", "privfer_test_backend", "EchoConfig",
                                                  "privfer_test_backend", private=False, exact_integers=True,
                                                  options=("context",)))
    config = backend_named("echo").round_config(3, settings={})
    result = aggregate({1: [np.ones(2)], 2: [np.ones(2)]}, config, context=b"x" * 32,
                       enrollments={1: None, 2: None})
    np.testing.assert_array_equal(result.total[0], [2.0, 2.0])
    assert seen["options"] == {"context": b"x" * 32}  # enrollments: not one of its options, not passed


def test_a_config_of_no_backend_is_a_type_error_naming_the_backends():
    with pytest.raises(TypeError, match="SecAggConfig, CKKSConfig, PlainConfig"):
        aggregate(UPDATES, object())
    with pytest.raises(ValueError, match="registered: masking, ckks, plain"):
        backend_named("rsa")
