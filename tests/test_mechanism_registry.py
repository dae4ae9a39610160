"""The privacy-mechanism registry (privfer/privacy/mechanisms/): one place holds each mechanism's facts, and the
config, the ledger, the node, the audit and the trainers read them from it."""

from __future__ import annotations

import json

import pytest

from privfer.config import load_config
from privfer.privacy.mechanisms import MECHANISMS, PrivacyMechanism, privacy_mechanism, select, units_of


def test_the_config_selects_a_registered_mechanism_by_its_selector_and_unit():
    cases = {
        ("privacy.epsilon=3", "aggregation.backend=masking"): "distributed",
        ("privacy.epsilon=3", "privacy.unit=person"): "distributed_person",
        ("privacy.epsilon=3", "aggregation.backend=ckks"): "local",
        ("privacy.epsilon=3", "privacy.mechanism=local"): "local",
        ("privacy.epsilon=inf",): None,
    }
    for overrides, expected in cases.items():
        config = load_config(None, list(overrides))
        assert config.mechanism_id == expected, overrides
        assert config.privacy_mechanism is (None if expected is None else MECHANISMS[expected])


def test_a_selection_no_mechanism_answers_is_refused_with_the_registered_ones():
    assert select(None, "person") is None
    with pytest.raises(ValueError, match="no privacy mechanism protects a person with privacy.mechanism 'local'"):
        select("local", "person")
    with pytest.raises(ValueError, match="known: "):
        privacy_mechanism("laplace")
    assert set(units_of("distributed")) == {"record", "person"} and units_of("local") == ("record",)
    from privfer.errors import ConfigError

    with pytest.raises(ConfigError, match="privacy.unit 'person' needs privacy.mechanism 'distributed'"):
        load_config(None, ["privacy.epsilon=3", "privacy.unit=person", "privacy.mechanism=local"])
    with pytest.raises(ConfigError, match="privacy.mechanism 'distributed' needs aggregation.backend 'masking'"):
        load_config(None, ["privacy.epsilon=3", "privacy.mechanism=distributed", "aggregation.backend=plain"])


def test_a_mechanism_must_state_what_its_ledger_says():
    with pytest.raises(ValueError, match="statement needs"):
        PrivacyMechanism(id="x", unit="record", selected_by="x", title="x", accounting="opacus",
                         takes_local_steps=True, per_sample_gradients=True, statement={"mechanism": "m"})
    with pytest.raises(ValueError, match="unit must be one of"):
        PrivacyMechanism(id="x", unit="household", selected_by="x", title="x", accounting="opacus",
                         takes_local_steps=True, per_sample_gradients=True,
                         statement={"mechanism": "m", "neighbouring_relation": "r", "public": []})


def test_ledgers_state_the_registered_sentences_and_editing_one_leaves_the_registry_alone():
    from privfer.privacy import recipe

    plan = recipe.plan_run(epsilon=3.0, delta=1e-4, rounds=4, clients=20, dimension=50)
    run = recipe.RunLedger()
    run.record(range(20))
    ledger = recipe.ledger(plan, run, persons=40).document()
    facts = MECHANISMS[ledger["mechanism_id"]]
    assert facts.unit == ledger["unit"] == "person"
    stated = facts.ledger_statement(noise=plan.family.title)
    assert {key: ledger[key] for key in stated} == stated
    assert plan.family.title in ledger["mechanism"] and "{noise}" not in json.dumps(ledger)
    ledger["public"].append("edited")
    assert "edited" not in facts.statement["public"]


def test_a_plans_clipping_bound_sample_rate_and_units_follow_the_mechanisms_unit():
    record, person = MECHANISMS["distributed"], MECHANISMS["distributed_person"]
    given = dict(max_grad_norm=1.0, sample_rate=0.01, max_update_norm=0.5, participation=0.8, clients=7, records=900)
    assert (record.plan_inputs(**given).max_grad_norm, record.plan_inputs(**given).sample_rate,
            record.plan_inputs(**given).records) == (1.0, 0.01, 900)
    assert (person.plan_inputs(**given).max_grad_norm, person.plan_inputs(**given).sample_rate,
            person.plan_inputs(**given).records) == (0.5, 0.8, 7)
    # the simulation's config translation and a Flower server's plan are the same calibration
    from privfer.privacy.distributed import calibrate_plan
    from privfer.privacy.node import DistributedDP

    config = load_config(None, ["privacy.epsilon=3", "privacy.unit=person", "federation.rounds=10"])
    from_config = calibrate_plan(config, delta=1e-4, dimension=100, steps=10, clients=20, records=20)
    privacy, aggregation = config.privacy, config.aggregation
    node = DistributedDP(epsilon=3.0, rounds=10, delta=1e-4, unit="person", max_update_norm=privacy.max_update_norm,
                         participation=privacy.participation, colluding_fraction=aggregation.colluding_fraction,
                         min_inputs_fraction=aggregation.min_inputs_fraction,
                         rounding_overhead=privacy.rounding_overhead, modulus_bits=aggregation.modulus_bits,
                         max_noise_multiplier=privacy.max_noise_multiplier).plan(20, 100)
    assert from_config == node
