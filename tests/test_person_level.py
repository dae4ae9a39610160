"""Person-level distributed DP (privacy.unit: person): clipping, secret participation, the server's view, the
ledger, the audits."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from conftest import small_config
from privfer.errors import ConfigError
from privfer.privacy.person import clip_update, mean_update, person_contribution, secret_coin
from privfer.fl.simulation import prepare_federation, simulate
from privfer.auditing import audit_path
from privfer.privacy.audit import MISMATCH, load_ledger
from privfer.privacy.distributed import calibrate_distributed, noise_generator
from privfer.privacy.noise import NoiseSteps, noise_family

SKELLAM = noise_family("skellam")
from privfer.secagg import aggregate
from privfer.secagg.config import SecAggConfig
from privfer.secagg.messages import MaskedInput
from privfer.secagg.plain import PlainConfig

PERSON = ["privacy.unit=person", "privacy.epsilon=3", "federation.rounds=3", "federation.adaptation=false",
          "model.hidden_size=8", "federation.local_epochs=1"]


def _plan(dimension: int = 64, clients: int = 3, participation: float = 0.5, bits: int = 32):
    return calibrate_distributed(epsilon=3.0, delta=1e-5, max_grad_norm=0.5, dimension=dimension,
                                 sample_rate=participation, steps=10, clients=clients, records=clients,
                                 min_inputs_fraction=1.0, colluding_fraction=0.0, rounding_overhead=0.01,
                                 modulus_bits=bits, max_noise_multiplier=50.0)


def test_person_unit_needs_the_noise_in_the_sum():
    assert small_config(*PERSON).mechanism_id == "distributed_person"
    assert small_config(*PERSON).model.recurrent == "lstm"  # whole updates: no per-sample gradients
    with pytest.raises(ConfigError, match="privacy.unit 'person' needs privacy.mechanism 'distributed'"):
        small_config(*PERSON, "privacy.mechanism=local")
    with pytest.raises(ConfigError, match="privacy.unit 'person'"):
        small_config(*PERSON, "aggregation.backend=ckks")
    with pytest.raises(ConfigError, match="privacy.participation"):
        small_config(*PERSON, "privacy.participation=0")
    with pytest.raises(ConfigError, match="fedper"):  # its newcomer head and personal scores would be unnoised
        small_config(*PERSON, "federation.strategy=fedper")
    assert small_config("privacy.unit=person").mechanism_id is None  # no DP: nothing to refuse


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=50), st.floats(1e-3, 1e3))
def test_clipping_bounds_the_norm_and_keeps_the_direction(values, bound):
    update = np.array(values)
    clipped = clip_update(update, bound)
    assert np.linalg.norm(clipped) <= bound * (1 + 1e-9)
    if np.linalg.norm(update) <= bound:
        assert np.array_equal(clipped, update)
    else:
        assert np.allclose(clipped * np.linalg.norm(update) / bound, update, rtol=1e-9, atol=1e-9)


def test_clipping_refuses_a_non_finite_update():
    with pytest.raises(ValueError, match="not finite"):
        clip_update(np.array([1.0, np.inf]), 1.0)


def test_the_coin_is_heads_at_the_participation_rate():
    # a fixed key (the OS draws one in a run): a test at p > 1e-4 on fresh keys fails once in 10,000 suites
    rng = noise_generator(bytes(range(32)))
    heads = sum(secret_coin(rng, 0.3) for _ in range(20_000))
    assert stats.binomtest(heads, 20_000, 0.3).pvalue > 1e-4
    assert all(secret_coin(rng, 1.0) for _ in range(100))
    with pytest.raises(ValueError):
        secret_coin(rng, 0.0)


def test_a_tails_contribution_is_noise_only_with_the_planned_variance():
    plan = _plan(dimension=20_000)
    tails = person_contribution(np.ones(plan.dimension), False, plan, noise_generator()).astype(np.float64)
    assert tails.size == plan.dimension
    assert abs(tails.mean()) < 5 * np.sqrt(plan.share_variance / tails.size)
    assert tails.var() == pytest.approx(plan.share_variance, rel=0.05)
    update = np.full(plan.dimension, 10.0)  # far beyond S: clipped to S before encoding
    heads = person_contribution(update, True, plan, noise_generator()).astype(np.float64)
    signal = heads.mean() / plan.scale  # S / sqrt(d) per coordinate, plus the share's noise
    error = 5 * np.sqrt(plan.share_variance / plan.dimension) / plan.scale
    assert signal == pytest.approx(plan.max_grad_norm / np.sqrt(plan.dimension), abs=error)
    for heads in (True, False):  # a bad update is an error whatever the coin says: an error never tells it
        with pytest.raises(ValueError, match="coordinates"):
            person_contribution(np.ones(3), heads, plan, noise_generator())
        with pytest.raises(ValueError, match="not finite"):
            person_contribution(np.full(plan.dimension, np.nan), heads, plan, noise_generator())


def test_the_public_denominator_makes_the_mean_unbiased():
    """E[sum of coin x clipped update] = p x sum of clipped updates, so dividing by p x included estimates the
    mean clipped update without the server knowing how many coins came up heads."""
    plan = _plan(dimension=4, clients=5, participation=0.4)
    updates = [np.array([0.1, -0.2, 0.05, 0.3]) * (k + 1) / 5 for k in range(5)]
    rng = noise_generator()
    estimates = []
    for _ in range(4000):
        total = sum(person_contribution(u, secret_coin(rng, plan.sample_rate), plan, rng) for u in updates)
        estimates.append(mean_update(total / plan.scale, plan, len(updates)))
    truth = np.mean([clip_update(u, plan.max_grad_norm) for u in updates], axis=0)
    spread = np.std(estimates, axis=0) / np.sqrt(len(estimates))
    assert np.all(np.abs(np.mean(estimates, axis=0) - truth) < 5 * spread)


def _server_view(heads: bool, rounds: int, backend: str) -> tuple[np.ndarray, set[tuple[str, int]]]:
    """Client 1's masked input as the server receives it, over ``rounds`` rounds, with the sizes of every
    message it sent. Its update is large (the coin matters as much as it can)."""
    plan = _plan(dimension=64, clients=3)
    update = np.full(plan.dimension, plan.max_grad_norm / 8)  # norm S
    if backend == "masking":
        config = SecAggConfig(num_clients=3, encoding="integer", integer_sum_bound=plan.sum_bound,
                              min_inputs=plan.min_inputs, graph="complete")
    else:
        config = PlainConfig(num_clients=3, encoding="integer", min_inputs=plan.min_inputs, wire_bits=32)
    words, sizes = [], set()
    for r in range(rounds):
        contributions = {
            1: person_contribution(update, heads, plan, noise_generator()),
            2: person_contribution(update, True, plan, noise_generator()),
            3: person_contribution(update, False, plan, noise_generator()),
        }
        result = aggregate({c: [v] for c, v in contributions.items()}, config, round_id=f"coin:{r}")
        if backend == "masking":
            mine = [e for e in result.transcript.entries if e.direction == "in" and e.party == 1]
            sizes |= {(e.stage, e.size) for e in mine}
            words.append(next(e.message.vector for e in mine if isinstance(e.message, MaskedInput)))
        else:  # positive control: what a server WITHOUT masking would see of client 1, its contribution itself
            words.append(contributions[1].astype(np.int64))
    return np.concatenate(words), sizes


def _histogram(words: np.ndarray) -> np.ndarray:
    return np.bincount((words.astype(np.uint64) >> np.uint64(28)).astype(np.int64), minlength=16)  # top 4 of 32


def test_the_server_cannot_tell_a_tails_client_from_a_heads_one():
    """The server's view of a client — every message it sends, its size, the masked words — has the same
    distribution whether its coin said contribute or zeros: the words are uniform either way."""
    heads, heads_sizes = _server_view(True, 150, "masking")
    tails, tails_sizes = _server_view(False, 150, "masking")
    assert heads_sizes == tails_sizes  # the same messages, byte for byte in length
    for words in (heads, tails):
        assert stats.chisquare(_histogram(words)).pvalue > 1e-4  # uniform over Z_2^32
    table = np.stack([_histogram(heads), _histogram(tails)])
    assert stats.chi2_contingency(table).pvalue > 1e-4  # and the two conditions are not told apart
    signed = lambda w: w.astype(np.int64) - 2**31  # the words read as numbers: the signal would shift them
    assert stats.ttest_ind(signed(heads), signed(tails)).pvalue > 1e-4
    # Positive control: the same mean test on what the plain (NOT private) sum sees tells them apart at once.
    # (3,000 rounds: the effect's t statistic is 16-19 there, so the control cannot fail by chance; at 400 rounds it
    # was about 6 and once fell to 4.6, past the threshold)
    plain_heads, _ = _server_view(True, 3000, "plain")
    plain_tails, _ = _server_view(False, 3000, "plain")
    assert stats.ttest_ind(plain_heads, plain_tails).pvalue < 1e-6


@pytest.fixture(scope="module")
def person_run(tmp_path_factory, small_clips):
    directory = tmp_path_factory.mktemp("person") / "run"
    config = small_config(*PERSON, "privacy.participation=0.5")
    result = simulate(config, directory, clips=small_clips)
    return config, result, directory


def test_a_person_level_run_releases_no_count_and_spends_its_budget(person_run, small_clips):
    config, result, directory = person_run
    assert result.privacy.unit == "person" and result.privacy.mechanism == "distributed_person"
    ledger = json.loads((directory / "privacy_ledger.json").read_text())
    assert ledger["unit"] == "person" and ledger["mechanism_id"] == "distributed_person"
    assert ledger["neighbouring_relation"].startswith("replace everything one person")
    assert "secret_participation" in ledger
    federation = prepare_federation(config, small_clips)
    persons = sum(len(group) for group in federation.clients.values())
    assert ledger["delta"] == pytest.approx(1 / (10 * persons))  # delta is judged against persons, not clips
    plan = ledger["phases"]["training"]
    assert plan["sample_rate"] == 0.5 and plan["max_grad_norm"] == config.privacy.max_update_norm
    assert plan["clients"] == len(federation.clients["training"])
    rounds = json.loads((directory / "rounds.json").read_text())
    for record in rounds:  # nothing about the coins, the losses or the clipping is released
        assert record["train_loss"] is None and record["clipped"] == 0
        assert set(record["included"]) == set(record["clients"])
    assert ledger["persons"] == persons
    for entry in ledger["clients"]:
        assert entry["records"] is None  # how many clips a person recorded is not published
        assert entry["epsilon"] <= 3.0 and entry["rounds_trained"] == 3
        # recomputed from the ledger alone
        history = [NoiseSteps(*entry["history"][0][:4], int(entry["history"][0][4]))]
        assert SKELLAM.epsilon(history, entry["delta"])[0] == pytest.approx(entry["epsilon"], rel=1e-9)
        assert entry["epsilon"] >= 0.9 * 3.0  # calibrated for a person in every round, as they all were


def test_the_person_level_ledger_recomputes_and_tampering_is_caught(person_run, tmp_path):
    _, _, directory = person_run
    report = audit_path(directory)
    assert report.passed and report.run_checks == [], ([c.reasons for c in report.clients], report.run_checks)
    original = json.loads((directory / "privacy_ledger.json").read_text())

    # a higher secret-participation rate claimed in the plan than the histories were computed with
    tampered = json.loads(json.dumps(original))
    tampered["phases"]["training"]["sample_rate"] = 0.25
    (tmp_path / "a.json").write_text(json.dumps(tampered))
    assert MISMATCH in audit_path(tmp_path / "a.json").clients[0].verdicts

    # consistent edits of every entry to a looser clipping bound: the ledger recomputes, the run does not
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(directory, copy)
    tampered = json.loads(json.dumps(original))
    tampered["max_grad_norm"] = tampered["phases"]["training"]["max_grad_norm"] = 0.1
    (copy / "privacy_ledger.json").write_text(json.dumps(tampered))
    report = audit_path(copy)
    assert any("max_grad_norm" in problem for problem in report.run_checks)
    assert any("clipping bound" in problem for problem in report.run_checks)
    from privfer.privacy.audit import LedgerError

    tampered = json.loads(json.dumps(original))
    tampered["unit"] = "record"  # a person-level mechanism relabelled: refused even without its run directory
    (tmp_path / "unit.json").write_text(json.dumps(tampered))
    with pytest.raises(LedgerError, match="'unit'"):
        load_ledger(tmp_path / "unit.json")

    # edits that keep the ledger consistent with itself: only the run's config and rounds can tell
    from privfer.privacy.distributed import sensitivities

    def consistent(edit) -> dict:
        ledger = json.loads(json.dumps(original))
        plan = ledger["phases"]["training"]
        edit(ledger, plan)
        plan["l1"], plan["l2"] = sensitivities(plan["max_grad_norm"], plan["scale"], plan["dimension"])
        history = [plan["mu"], plan["l1"], plan["l2"], plan["sample_rate"]]
        for entry in ledger["clients"]:
            entry["history"] = [[*history, entry["history"][0][4]]]
            entry["delta"] = plan["delta"] = ledger["delta"]
            entry["epsilon"] = SKELLAM.epsilon([NoiseSteps(*history, entry["history"][0][4])], ledger["delta"])[0]
        ledger["epsilon_max"] = max(e["epsilon"] for e in ledger["clients"])
        ledger["epsilon_median"] = statistics.median(e["epsilon"] for e in ledger["clients"])
        plan["noise_multiplier"] = math.sqrt(plan["mu"]) / plan["l2"]
        return ledger

    def more_noise(ledger, plan):
        plan["mu"] *= 4
        plan["share_variance"] *= 4

    def coarser(ledger, plan):
        plan["scale"] /= 4

    def larger_delta(ledger, plan):
        ledger["delta"] = 0.5 / plan["clients"]

    def more_persons(ledger, plan):  # the federation claimed ten times larger, so delta judged against more
        ledger["persons"] *= 10

    for edit, field in ((more_noise, "mu"), (coarser, "scale"), (larger_delta, "delta"), (more_persons, "persons")):
        edited = consistent(edit)
        (tmp_path / "alone.json").write_text(json.dumps(edited))
        alone = audit_path(tmp_path / "alone.json")
        assert alone.run_checks is None and not any(MISMATCH in c.verdicts for c in alone.clients)  # self-consistent
        (copy / "privacy_ledger.json").write_text(json.dumps(edited))
        report = audit_path(copy)
        assert not report.passed and any(field in problem for problem in report.run_checks), report.run_checks


@pytest.mark.slow
def test_canary_persons_bound_epsilon_below_the_claim_and_find_no_noise():
    from privfer.auditing.empirical import run_canary_audit

    base = [*PERSON, "data.synthetic.actors=16", "data.split.val_actors=2", "data.split.test_actors=2",
            "data.feature_dim=16", "federation.rounds=4"]
    private = run_canary_audit(small_config(*base, "privacy.epsilon=1", "privacy.participation=0.5"), canaries=120,
                               guesses=40, delta=1e-5)
    assert private.ceiling > private.claimed_epsilon  # the audit could show a violation: none is found
    assert private.epsilon_lower_bound <= private.claimed_epsilon
    assert private.sample_rate == 0.5 and private.steps == 4
    # almost no noise and every coin heads: the canary persons are found, so the audit has power
    loud = run_canary_audit(small_config(*base, "privacy.epsilon=1000"), canaries=120, guesses=40, delta=1e-5)
    assert loud.correct >= 38 and loud.epsilon_lower_bound > 1.0
