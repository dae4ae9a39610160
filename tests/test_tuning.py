"""privfer tune: the budget of every candidate composed within the user's epsilon, private validation scores, the
tuning ledger and its audit (a tampered candidate count, file, claim or validation ledger is flagged)."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import special

from conftest import small_config
from privfer.auditing.tuning import TAMPERED, audit_tuning
from privfer.errors import ConfigError, RunDirectoryError
from privfer.fl.rounds import TRAINING
from privfer.fl.tuning import (PILOT_SHARE, candidate_budget, default_space, final_budget, parse_space, plan_tuning,
                               release_score, space_candidates, tune)
from privfer.privacy.audit import MISMATCH, OVER_BUDGET
from privfer.privacy.audit.distributed import independent_composed_epsilon
from privfer.privacy.calibrate import EPSILON_TOLERANCE, PrivacyBudgetError
from privfer.privacy.distributed import calibrate_distributed, calibrate_plan
from privfer.privacy.ledger import read_ledger
from privfer.privacy.ledger import LedgerError
from privfer.privacy.ledger.tuning import TUNABLE, TUNING_LEDGER_FILE, parse_tuning_ledger, read_tuning_ledger
from privfer.privacy.rdp import ORDERS, rdp_to_epsilon

FAST = ["privacy.epsilon=3", "federation.rounds=3"]
SPACE = ["federation.server_lr=0.02,0.1"]


# --- the search space ---

def test_the_space_is_declared_and_bounded():
    assert parse_space(None) == {}
    # the default space: the readout, the config's own first (ties go to it), at the step the config resolves
    assert default_space(small_config(*FAST)) == {"model.readout": ["both", "mean"]}  # the default readout: both
    assert default_space(small_config(*FAST, "model.readout=mean")) == {"model.readout": ["mean", "last"]}
    assert default_space(small_config(*FAST, "model.readout=last")) == {"model.readout": ["last", "mean"]}
    space = parse_space(["federation.server_lr=0.02, 0.05", "model.readout=mean,last"])
    assert space == {"federation.server_lr": [0.02, 0.05], "model.readout": ["mean", "last"]}
    assert space_candidates(space) == [
        {"federation.server_lr": 0.02, "model.readout": "mean"}, {"federation.server_lr": 0.02, "model.readout": "last"},
        {"federation.server_lr": 0.05, "model.readout": "mean"}, {"federation.server_lr": 0.05, "model.readout": "last"}]
    with pytest.raises(ConfigError, match="searches only"):  # not only the CLI's parser: the planner too
        plan_tuning(small_config(*FAST), {"aggregation.colluding_fraction": [0.0]})
    for bad, said in [("privacy.epsilon=1,2", "searches only"), ("federation.server_lr", "must look like"),
                      ("federation.server_lr=0.1,0.1", "listed twice"), ("model.readout=[1]", "not a number")]:
        with pytest.raises(ConfigError, match=said):
            parse_space([bad])
    with pytest.raises(ConfigError, match="given twice"):
        parse_space(["federation.server_lr=0.1", "federation.server_lr=0.2"])


def test_the_default_space_tries_two_readouts_at_the_rules_step(small_clips):
    plan = plan_tuning(small_config(*FAST), {}, clips=small_clips)
    assert plan.space == {"model.readout": ["both", "mean"]}
    assert [c.settings for c in plan.candidates] == [{"model.readout": "both"}, {"model.readout": "mean"}]
    for candidate in plan.candidates:  # the (256 / D)^(1/3) rule at D = 128, the shortcut kept
        assert candidate.config.resolved_server_lr(small_clips.feature_dim) == pytest.approx(0.02 * 2 ** (1 / 3))
        assert candidate.config.model.shortcut is True  # the rest of the shape is the config's
        assert candidate.config.model.readout == candidate.settings["model.readout"]
        assert plan.final_config(candidate.index).model.readout == candidate.settings["model.readout"]


def test_more_candidates_than_allowed_or_another_mechanism_is_refused(small_clips):
    with pytest.raises(ConfigError, match="at most 16"):
        plan_tuning(small_config(*FAST), parse_space(["federation.server_lr=1,2,3,4,5", "model.hidden_size=1,2,3,4"]),
                    clips=small_clips)
    with pytest.raises(ConfigError, match="privacy.mechanism 'distributed'"):
        plan_tuning(small_config(*FAST, "privacy.mechanism=local"), {}, clips=small_clips)
    with pytest.raises(ConfigError, match="scores its candidates exactly"):
        plan_tuning(small_config("federation.rounds=3"), {}, "private", clips=small_clips)
    with pytest.raises(ConfigError, match="candidate 1 \\(model.hidden_size=0\\)"):
        plan_tuning(small_config(*FAST), parse_space(["model.hidden_size=8,0"]), clips=small_clips)


# --- the budget: every candidate composed within the user's epsilon ---

@pytest.fixture(scope="module")
def training_shape(small_clips):
    plan = plan_tuning(small_config(*FAST), {"federation.server_lr": [0.02]}, clips=small_clips)
    return plan.candidates[0]


@settings(max_examples=12, deadline=None)
@given(epsilon=st.floats(0.8, 10.0), count=st.integers(1, 6))
def test_the_candidates_composed_stay_within_the_budget_and_use_it(training_shape, epsilon, count):
    candidates = [SimpleNamespace(config=training_shape.config, federation=training_shape.federation)] * count
    delta = training_shape.federation.delta
    budget, composed = candidate_budget(epsilon, delta, candidates)
    shape = training_shape.federation.plans[TRAINING]
    trial = training_shape.config.model_copy(deep=True)
    trial.privacy.epsilon = budget
    plan = calibrate_plan(trial, delta=delta, dimension=shape.dimension, steps=shape.steps, clients=shape.clients,
                          records=shape.records)
    history = [plan.steps_entry(plan.steps)] * count
    # recomputed by the audit's independent implementation: within the budget, and not wastefully below it
    independent = independent_composed_epsilon(plan.family, history, delta)
    assert math.isclose(independent, composed, rel_tol=1e-6, abs_tol=1e-6)
    assert composed <= epsilon + 1e-9
    # each candidate's own calibration stops within 0.01 below its budget, so the composition moves in steps
    assert composed >= epsilon - 3 * EPSILON_TOLERANCE or count == 1
    assert budget <= epsilon and (count > 1 or budget == epsilon)


def _noise(training_shape, budget):
    shape = training_shape.federation.plans[TRAINING]
    trial = training_shape.config.model_copy(deep=True)
    trial.privacy.epsilon = budget
    delta = training_shape.federation.delta
    return calibrate_plan(trial, delta=delta, dimension=shape.dimension, steps=shape.steps, clients=shape.clients,
                          records=shape.records)


@settings(max_examples=10, deadline=None)
@given(epsilon=st.floats(0.8, 10.0), count=st.integers(2, 5), share=st.floats(0.1, 0.9))
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
def test_the_pilots_and_the_final_run_compose_within_the_budget(training_shape, epsilon, count, share):
    """N pilots at the share's budget and one final run at the budget left: the composition (recomputed by the
    audit's independent implementation) is within epsilon and uses it, and the final run's noise is below what each
    of N candidates sharing the whole budget would need."""
    candidates = [SimpleNamespace(config=training_shape.config, federation=training_shape.federation)] * count
    delta = training_shape.federation.delta
    try:
        pilot, pilots_composed = candidate_budget(share * epsilon, delta, candidates)
    except PrivacyBudgetError as exc:  # a small share of a small budget: beyond the noise cap, said in one line
        assert "max_noise_multiplier" in str(exc) and share * epsilon < 1.0
        return
    final, composed = final_budget(epsilon, delta, candidates, pilot, candidates[0])
    history = [_noise(training_shape, pilot).steps_entry(_noise(training_shape, pilot).steps)] * count
    last = _noise(training_shape, final)
    independent = independent_composed_epsilon(last.family, [*history, last.steps_entry(last.steps)], delta)
    assert math.isclose(independent, composed, rel_tol=1e-6, abs_tol=1e-6)
    assert pilots_composed <= share * epsilon + 1e-9 and composed <= epsilon + 1e-9
    assert composed >= epsilon - 3 * EPSILON_TOLERANCE  # the budget is used
    shared, _ = candidate_budget(epsilon, delta, candidates)  # N candidates, no final run
    if share <= 0.5:  # a larger share leaves the final run less than sharing the whole budget would
        assert last.noise_multiplier < _noise(training_shape, shared).noise_multiplier
    assert pilot < epsilon and final < epsilon


def test_the_final_runs_noise_at_the_default_share_is_a_ninth_above_one_runs(training_shape):
    """The worked figure docs/privacy-accounting.md gives: two pilots at the default share 0.4 of epsilon 3, then the
    final run: its noise is about 1.1x of a single run at the whole budget (each of two candidates sharing the whole
    budget needs about 1.4x), each pilot's about 3.2x."""
    candidates = [SimpleNamespace(config=training_shape.config, federation=training_shape.federation)] * 2
    delta = training_shape.federation.delta
    alone = _noise(training_shape, 3.0).noise_multiplier
    pilot, _ = candidate_budget(PILOT_SHARE * 3.0, delta, candidates)
    final, _ = final_budget(3.0, delta, candidates, pilot, candidates[0])
    shared, _ = candidate_budget(3.0, delta, candidates)
    assert 1.05 < _noise(training_shape, final).noise_multiplier / alone < 1.2
    assert 1.35 < _noise(training_shape, shared).noise_multiplier / alone < 1.5
    assert 2.7 < _noise(training_shape, pilot).noise_multiplier / alone < 3.7


def test_a_budget_whose_even_split_is_below_the_noise_cap_is_still_found(training_shape):
    """epsilon / N per candidate may need more noise than privacy.max_noise_multiplier while the composition's
    solution (about epsilon / sqrt(N)) does not: the search finds it, and refuses in one line when the cap is below
    it."""
    def with_cap(cap):
        config = training_shape.config.model_copy(deep=True)
        config.privacy.max_noise_multiplier = cap
        return [SimpleNamespace(config=config, federation=training_shape.federation)] * 3

    delta = training_shape.federation.delta
    budget, composed = candidate_budget(3.0, delta, with_cap(50.0))
    shape = training_shape.federation.plans[TRAINING]
    trial = training_shape.config.model_copy(deep=True)
    trial.privacy.epsilon = budget
    at_budget = calibrate_plan(trial, delta=delta, dimension=shape.dimension, steps=shape.steps, clients=shape.clients,
                               records=shape.records).noise_multiplier
    trial.privacy.epsilon = 1.0
    at_split = calibrate_plan(trial, delta=delta, dimension=shape.dimension, steps=shape.steps, clients=shape.clients,
                              records=shape.records).noise_multiplier
    assert at_budget * 1.05 < at_split  # under this cap epsilon / 3 per candidate is out of reach
    capped, capped_composed = candidate_budget(3.0, delta, with_cap(at_budget * 1.05))
    assert capped_composed <= 3.0 + 1e-9 and abs(capped - budget) < 0.02
    with pytest.raises(PrivacyBudgetError, match="max_noise_multiplier"):
        candidate_budget(3.0, delta, with_cap(at_budget * 0.95))


def test_composition_is_the_worked_example_and_random_repetitions_cost_more():
    """N fixed candidates of one mechanism compose as N x its RDP (worked by hand from the family's RDP); with a
    random number of candidates K, every one of which the server sees, the RDP of the release of all of them is
    log E[exp((alpha - 1) K rho)] / (alpha - 1) >= E[K] rho (Jensen): Papernot & Steinke's Poisson or truncated
    negative binomial repetition never charges less once every repetition is seen."""
    plan = calibrate_distributed(epsilon=2.0, delta=1e-5, max_grad_norm=1.0, dimension=1000, sample_rate=0.5,
                                 steps=20, clients=10, records=500, min_inputs_fraction=0.5, colluding_fraction=0.1,
                                 rounding_overhead=0.01, modulus_bits=32, max_noise_multiplier=100.0)
    family, entry = plan.family, plan.steps_entry(plan.steps)
    rho = family.history_rdp([entry])
    orders = np.array(ORDERS, dtype=float)
    with np.errstate(over="ignore", divide="ignore"):  # inf at large orders and log(0) of a vanishing pmf: limits
        _random_repetitions_cost_more(family, entry, rho, orders)


def _random_repetitions_cost_more(family, entry, rho, orders):
    for n in (1, 3, 8):
        by_hand = rdp_to_epsilon(ORDERS, n * rho, 1e-5)[0]
        assert math.isclose(family.epsilon([entry] * n, 1e-5)[0], by_hand, rel_tol=1e-12)
        # Poisson(n) repetitions, all seen: log E[exp((a-1) K rho)] = n (exp((a-1) rho) - 1)
        poisson = n * np.expm1((orders - 1) * rho) / (orders - 1)
        assert np.all(poisson >= n * rho - 1e-12)
        assert rdp_to_epsilon(ORDERS, poisson, 1e-5)[0] >= by_hand
        # truncated negative binomial (eta = 2) with mean n, all seen: log-PGF at exp((a-1) rho) >= n rho
        k = np.arange(1, 4000)
        pmf = _tnb_pmf(k, _tnb_gamma(k, n))
        converges = (orders - 1) * rho < 5.0  # where the truncated sum is accurate
        log_pgf = special.logsumexp(np.log(pmf)[None, :] + np.outer((orders[converges] - 1) * rho[converges], k),
                                    axis=1)
        assert np.all(log_pgf / (orders[converges] - 1) >= float((k * pmf).sum()) * rho[converges] - 1e-9)


def _tnb_pmf(k: np.ndarray, gamma: float, eta: int = 2) -> np.ndarray:
    """Papernot & Steinke's truncated negative binomial: P(K = k) proportional to C(k + eta - 1, k) (1 - gamma)^k,
    k >= 1."""
    weights = special.comb(k + eta - 1, k) * (1 - gamma) ** k
    return weights / weights.sum()


def _tnb_gamma(k: np.ndarray, mean: float) -> float:
    low, high = 1e-3, 1.0 - 1e-9  # E[K] falls as gamma grows
    for _ in range(80):
        gamma = (low + high) / 2
        low, high = (gamma, high) if float((k * _tnb_pmf(k, gamma)).sum()) > mean else (low, gamma)
    return (low + high) / 2


# --- a tuning run, end to end ---

@pytest.fixture(scope="module")
def tuned(tmp_path_factory, small_clips):
    folder = tmp_path_factory.mktemp("tune") / "run"
    config = small_config(*FAST)
    result = tune(config, parse_space(SPACE), folder, clips=small_clips)
    return folder, config, result


def test_a_tuned_run_never_exceeds_the_users_epsilon_and_its_audit_passes(tuned):
    folder, config, result = tuned
    ledger = read_tuning_ledger(folder)
    assert len(ledger.candidates) == 2 == ledger.candidates_declared
    # every training client composed over both candidates, every validation client over both releases: <= 3
    assert result.epsilon_max <= 3.0 + 1e-9 and result.validation_epsilon_max <= 3.0 + 1e-9
    assert result.epsilon_max >= 3.0 - 2 * EPSILON_TOLERANCE  # the budget is used, not wasted
    for candidate in ledger.candidates:
        assert read_ledger(folder / candidate.run / "privacy_ledger.json").target_epsilon == result.candidate_epsilon
    assert all(entry.candidates == 2 for entry in ledger.clients)
    scores = [c["score"] for c in result.candidates]
    assert result.chosen == int(np.argmax(scores)) == ledger.chosen
    validation = read_ledger(folder / "validation_ledger.json")
    assert {e.rounds_trained for e in validation.clients} == {2} and validation.phases["validation"].dimension == 1
    assert not (folder / "tuning_state.json").exists()  # the validation key is gone with the run
    audit = audit_tuning(folder)
    assert audit.passed, audit.reasons
    # the audit recomposed both candidates' histories itself (one candidate alone would give about 2)
    assert math.isclose(audit.epsilon_max, result.epsilon_max, rel_tol=1e-6) and audit.epsilon_max <= 3.0 + 1e-9


def test_the_final_run_is_the_release_and_is_charged(tuned):
    """Under DP the chosen settings train once more at the budget the candidates left: that run's model and test
    scores are the result, its ledger is in every client's composition, and the audit recomposes it."""
    folder, config, result = tuned
    ledger = read_tuning_ledger(folder)
    assert ledger.pilot_share == PILOT_SHARE == result.pilot_share and result.released == "final"
    assert ledger.final.settings == ledger.candidates[ledger.chosen].settings == result.settings
    final = read_ledger(folder / "final" / "privacy_ledger.json")
    assert final.target_epsilon == result.final_epsilon == ledger.final.epsilon
    assert result.candidate_epsilon < result.final_epsilon < 3.0
    assert all(entry.final for entry in ledger.clients)
    run = json.loads((folder / "final" / "result.json").read_text())
    assert run["test"] == result.test  # the final run's scores, not the chosen candidate's
    candidate = json.loads((folder / ledger.candidates[ledger.chosen].run / "result.json").read_text())
    assert candidate["test"] != result.test
    # the candidates alone compose to about the pilot share of the budget; with the final run, to about all of it
    alone = audit_tuning(folder)
    assert alone.epsilon_max >= 3.0 - 2 * EPSILON_TOLERANCE
    assert max(c["accountant"] for c in alone.clients) <= 3.0 + 1e-9


def test_a_pilot_share_of_one_has_no_final_run_and_bad_shares_are_refused(tmp_path, small_clips):
    result = tune(small_config(*FAST), parse_space(SPACE), tmp_path / "run", clips=small_clips, pilot_share=1)
    ledger = read_tuning_ledger(tmp_path / "run")
    assert ledger.final is None and ledger.pilot_share == 1 and not (tmp_path / "run" / "final").exists()
    assert result.final_epsilon is None and result.released == ledger.candidates[ledger.chosen].run
    assert audit_tuning(tmp_path / "run").passed
    # a final directory the ledger does not list: rounds the server saw, charged nowhere
    shutil.copytree(tmp_path / "run" / "candidates" / "00", tmp_path / "run" / "final")
    audit = audit_tuning(tmp_path / "run")
    assert TAMPERED in audit.verdicts and any("no final run" in r for r in audit.reasons)
    for bad in (0.0, 1.5, float("nan"), True):
        with pytest.raises(ConfigError, match="--pilot-share must be a number in"):
            plan_tuning(small_config(*FAST), parse_space(SPACE), clips=small_clips, pilot_share=bad)
    with pytest.raises(ConfigError, match="has no DP"):
        plan_tuning(small_config("federation.rounds=3"), parse_space(SPACE), clips=small_clips, pilot_share=0.5)
    # one candidate: nothing to choose, so no pilots (the whole budget, no final run); a share asked for is refused
    single = plan_tuning(small_config(*FAST), parse_space(["federation.server_lr=0.05"]), clips=small_clips)
    assert single.pilot_share == 1.0 and not single.final and single.budget == 3.0
    with pytest.raises(ConfigError, match="needs two or more candidates"):
        plan_tuning(small_config(*FAST), parse_space(["federation.server_lr=0.05"]), clips=small_clips,
                    pilot_share=0.5)
    # a share so large that the final run would need more noise than the cap allows names the share
    with pytest.raises(PrivacyBudgetError, match="lower --pilot-share"):
        plan_tuning(small_config("privacy.epsilon=0.5", "federation.rounds=3"), parse_space(SPACE), clips=small_clips,
                    pilot_share=0.999)
    # a tuning directory from before final runs (its space.json has no pilot share) reads back with a share of 1
    space = json.loads((tmp_path / "run" / "space.json").read_text())
    space.pop("pilot_share")
    (tmp_path / "run" / "space.json").write_text(json.dumps(space))
    shutil.rmtree(tmp_path / "run" / "final")
    with pytest.raises(RunDirectoryError, match="it was run with --pilot-share 1"):
        tune(small_config(*FAST), parse_space(SPACE), tmp_path / "run", clips=small_clips)
    assert tune(small_config(*FAST), parse_space(SPACE), tmp_path / "run", clips=small_clips,
                pilot_share=1).to_json() == result.to_json()


def test_the_audit_flags_a_forged_final_run(tuned, tmp_path):
    def edit_final_ledger(folder):
        path = folder / "final" / "privacy_ledger.json"
        path.write_text(path.read_text().replace('"steps": 3', '"steps": 2', 1))

    assert TAMPERED in _tampered(tuned, tmp_path / "a", edit_final_ledger).verdicts

    def cheaper_final(folder):  # the final run's config and claim lowered, the digests re-bound
        path = folder / "final" / "config.yaml"
        path.write_text(path.read_text().replace("colluding_fraction: 0.1", "colluding_fraction: 0.0"))

    audit = _tampered(tuned, tmp_path / "b", cheaper_final)
    assert MISMATCH in audit.verdicts and any("final/config.yaml" in r for r in audit.reasons)

    audit = _tampered(tuned, tmp_path / "c", _edit_ledger(lambda d: d["final"].update(epsilon=d["final"]["epsilon"] / 2)))
    assert MISMATCH in audit.verdicts and any("budget leaves it" in r for r in audit.reasons)

    def hide_final(document):  # the final run dropped from the ledger: as if the candidates had the whole budget
        document["final"], document["pilot_share"] = None, 1.0
        for entry in document["clients"]:
            entry["final"] = False

    audit = _tampered(tuned, tmp_path / "d", _edit_ledger(hide_final))
    assert TAMPERED in audit.verdicts and any("no final run" in r for r in audit.reasons)
    assert any("each calibrated to" in r for r in audit.reasons)  # share 1 would have given each candidate more
    with pytest.raises(LedgerError, match="not the chosen candidate's settings"):
        _tampered(tuned, tmp_path / "e", _edit_ledger(lambda d: d["final"].update(settings={
            "federation.server_lr": 0.5})))

    def extra_chosen(document):  # a third candidate listed and chosen: a verdict, not a traceback (review)
        extra = {**document["candidates"][1], "index": 2, "run": "candidates/02", "score": 1e9,
                 "settings": {"federation.server_lr": 0.3}}
        document["candidates"].append(extra)
        document["chosen"], document["final"]["settings"] = 2, extra["settings"]

    audit = _tampered(tuned, tmp_path / "f", _edit_ledger(extra_chosen))
    assert TAMPERED in audit.verdicts and not audit.passed


def test_a_final_run_hidden_by_lowering_the_target_is_refused_against_the_promise(tuned, tmp_path):
    """The pilots of a run at epsilon E and share s are exactly the candidates of a run with the whole of s x E, so a
    directory whose final run is deleted and whose every file is rewritten at target s x E reads as that smaller run
    (the review's forgery, rebuilt here with privfer's own ledger code): only the promised budget refuses it."""
    from typer.testing import CliRunner

    from privfer.cli import app
    from privfer.fl.tuning import plan_tuning as plan_of, tuning_ledgers

    folder, config, result = tuned
    forged = tmp_path / "forged"
    shutil.copytree(folder, forged)
    shutil.rmtree(forged / "final")
    smaller = small_config(*FAST, f"privacy.epsilon={PILOT_SHARE * 3.0!r}")
    text = (forged / "config.yaml").read_text()
    (forged / "config.yaml").write_text(text.replace("epsilon: 3.0", f"epsilon: {PILOT_SHARE * 3.0!r}"))
    plan = plan_of(smaller, parse_space(SPACE), pilot_share=1.0)
    assert plan.budget == result.candidate_epsilon  # the pilots are that smaller run's candidates, bit for bit
    scores = {c["index"]: c["score"] for c in result.candidates}
    ledger, validation = tuning_ledgers(smaller, plan, forged, scores, result.chosen)
    from privfer.privacy.ledger import write_ledger

    write_ledger(forged / "validation_ledger.json", validation)
    import hashlib

    document = {**ledger.document(), "validation_ledger_sha256": hashlib.sha256(
        (forged / "validation_ledger.json").read_bytes()).hexdigest()}
    (forged / TUNING_LEDGER_FILE).write_text(json.dumps(document))
    assert audit_tuning(forged).passed  # a consistent smaller run: the audit alone cannot tell
    assert not audit_tuning(forged, promised=3.0).passed
    runner = CliRunner()
    assert runner.invoke(app, ["audit", str(forged)]).exit_code == 0
    refused = runner.invoke(app, ["audit", str(forged), "--epsilon", "3"])
    assert refused.exit_code == 1 and "not the promised 3" in refused.output
    assert runner.invoke(app, ["audit", str(folder), "--epsilon", "3"]).exit_code == 0
    # an ordinary run's audit holds its target to the promise the same way
    candidate = str(folder / "candidates" / "00")
    assert runner.invoke(app, ["audit", candidate, "--epsilon", str(result.candidate_epsilon)]).exit_code == 0
    refused = runner.invoke(app, ["audit", candidate, "--epsilon", "3"])
    assert refused.exit_code == 1 and "NOT THE PROMISED BUDGET" in refused.output
    assert "PASS" not in refused.output.splitlines()[-1]
    for bad in ("nan", "inf", "-1"):
        refused = runner.invoke(app, ["audit", candidate, "--epsilon", bad])
        assert refused.exit_code == 2 and "--epsilon must be a finite positive budget" in refused.output


def test_a_version_1_ledger_is_still_read(tuned):
    document = json.loads((tuned[0] / TUNING_LEDGER_FILE).read_text())
    for name in ("pilot_share", "final"):
        document.pop(name)
    for entry in document["clients"]:
        entry.pop("final")
    with pytest.raises(LedgerError, match="pilot_share"):
        parse_tuning_ledger(document)
    document["schema"] = "privfer.tuning_ledger/1"
    assert parse_tuning_ledger(document).final is None
    document["pilot_share"] = 0.5
    with pytest.raises(LedgerError, match="/1 document has no pilot_share"):
        parse_tuning_ledger(document)


def test_rerunning_a_finished_tuning_run_returns_its_result(tuned, small_clips):
    folder, config, result = tuned
    again = tune(config, parse_space(SPACE), folder, clips=small_clips)
    assert again.to_json() == result.to_json()


def test_released_scores_are_near_the_counts_and_repeat_exactly(tuned):
    folder, config, result = tuned
    plan = plan_tuning(config, parse_space(SPACE), clips=None).validation_plan
    values = {1: 30.0, 2: 10.0, 3: 25.0, 4: 0.0}
    key = bytes(32)
    first = release_score(values, plan, config, key, "0", {})
    assert first == release_score(values, plan, config, key, "0", {})  # keyed: a repeated release is the same
    draws = np.array([release_score(values, plan, config, bytes([i]) * 32, "0", {}) for i in range(60)])
    sigma = math.sqrt(plan.mu) / plan.scale
    assert abs(draws.mean() - 65.0) < 4 * sigma / math.sqrt(60)
    assert 0.6 * sigma < draws.std() < 1.5 * sigma


def _tampered(tuned, tmp_path, edit):
    folder = tmp_path / "copy"
    shutil.copytree(tuned[0], folder)
    edit(folder)
    return audit_tuning(folder)


def _edit_ledger(change):
    def edit(folder):
        path = folder / TUNING_LEDGER_FILE
        document = json.loads(path.read_text())
        change(document)
        path.write_text(json.dumps(document))
    return edit


def test_the_audit_flags_a_tampered_candidate_count(tuned, tmp_path):
    def drop_one(document):
        keep = document["chosen"]
        document["candidates"] = [c for c in document["candidates"] if c["index"] == keep]
        document["candidates"][0]["index"], document["candidates"][0]["run"] = 0, "candidates/00"
        document["chosen"] = 0

    audit = _tampered(tuned, tmp_path, _edit_ledger(drop_one))
    assert not audit.passed and TAMPERED in audit.verdicts
    assert any("declares 2" in reason for reason in audit.reasons)

    audit = _tampered(tuned, tmp_path / "b", _edit_ledger(lambda d: d.update(candidates_declared=1)))
    assert TAMPERED in audit.verdicts

    def shrink_space(document):  # the count made consistent: the unlisted candidate's directory still betrays it
        drop_one(document)
        settings = document["candidates"][0]["settings"]
        document["space"] = {k: [v] for k, v in settings.items()}
        document["candidates_declared"] = 1

    audit = _tampered(tuned, tmp_path / "c", _edit_ledger(shrink_space))
    assert TAMPERED in audit.verdicts and any("not in the ledger" in r for r in audit.reasons)


def test_the_audit_flags_edited_files_and_claims(tuned, tmp_path):
    def edit_candidate_ledger(folder):
        path = folder / "candidates" / "01" / "privacy_ledger.json"
        path.write_text(path.read_text().replace('"steps": 3', '"steps": 2', 1))

    assert TAMPERED in _tampered(tuned, tmp_path / "a", edit_candidate_ledger).verdicts

    def lower_claim(document):
        for entry in document["clients"]:
            entry["epsilon"] = 1.0
        document["epsilon_max"] = 1.0

    assert MISMATCH in _tampered(tuned, tmp_path / "b", _edit_ledger(lower_claim)).verdicts

    def validation_edit(folder):
        path = folder / "validation_ledger.json"
        path.write_text(path.read_text() + " ")

    assert TAMPERED in _tampered(tuned, tmp_path / "c", validation_edit).verdicts

    def smaller_target(document):  # the composition is held to the stated budget
        document["target_epsilon"] = 1.5

    audit = _tampered(tuned, tmp_path / "d", _edit_ledger(smaller_target))
    assert OVER_BUDGET in audit.verdicts


def test_consenting_validation_is_named_not_covered(tmp_path, small_clips):
    config = small_config(*FAST)
    result = tune(config, parse_space(["federation.server_lr=0.05"]), tmp_path / "run", clips=small_clips,
                  validation="consenting")
    ledger = read_tuning_ledger(tmp_path / "run")
    assert ledger.validation_ledger is None and not (tmp_path / "run" / "validation_ledger.json").exists()
    assert any("consenting" in line for line in ledger.not_covered) and result.not_covered
    assert result.candidate_epsilon == 3.0  # one candidate: the whole budget
    assert 0.0 <= result.candidates[0]["score"] <= 1.0  # the exact validation macro F1
    assert audit_tuning(tmp_path / "run").passed
    path = tmp_path / "run" / TUNING_LEDGER_FILE
    document = json.loads(path.read_text())
    document["not_covered"] = []
    path.write_text(json.dumps(document))
    assert MISMATCH in audit_tuning(tmp_path / "run").verdicts


def test_cli_tune_and_audit(tmp_path, small_clips):
    from typer.testing import CliRunner

    from privfer.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["tune", "--try", "privacy.noise=skellam", "--epsilon", "3"])
    assert bad.exit_code == 2 and "searches only" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["tune", "--pilot-share", "2", "--epsilon", "3"])
    assert bad.exit_code == 2 and "--pilot-share must be a number in [0.05, 1], got 2.0" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    # a finished tuning run is audited as one: exit 0, and 1 once its candidate count is tampered with
    folder = tmp_path / "run"
    tune(small_config(*FAST), parse_space(SPACE), folder, clips=small_clips)
    assert runner.invoke(app, ["audit", str(folder)]).exit_code == 0
    _edit_ledger(lambda d: d.update(candidates_declared=3))(folder)
    failed = runner.invoke(app, ["audit", str(folder)])
    assert failed.exit_code == 1 and "TAMPERED" in failed.output


class _Killed(Exception):
    pass


def test_a_killed_tuning_run_resumes_without_a_new_release(tmp_path, small_clips):
    config, folder = small_config(*FAST), tmp_path / "run"

    def kill(candidate, score, test):
        if candidate.index == 0:
            raise _Killed

    with pytest.raises(_Killed):
        tune(config, parse_space(SPACE), folder, clips=small_clips, on_candidate=kill)
    state = json.loads((folder / "tuning_state.json").read_text())
    released = state["scores"]["0"]
    result = tune(config, parse_space(SPACE), folder, clips=small_clips)
    assert result.candidates[0]["score"] == released  # the score released before the kill, not a second draw
    assert audit_tuning(folder).passed
    # the same directory with another search space is refused, not mixed
    with pytest.raises(RunDirectoryError, match="another search space"):
        tune(config, parse_space(["federation.server_lr=0.3,0.4"]), folder, clips=small_clips)


def test_a_run_killed_in_its_final_run_resumes_it_and_a_deleted_one_is_refused(tmp_path, small_clips):
    config, folder = small_config(*FAST), tmp_path / "run"

    def kill(final_config):
        raise _Killed

    with pytest.raises(_Killed):  # killed once every score is released, before the final run's first round
        tune(config, parse_space(SPACE), folder, clips=small_clips, on_final=kill)
    state = json.loads((folder / "tuning_state.json").read_text())
    assert len(state["scores"]) == 2 and not state["final_started"]
    shutil.copytree(folder, tmp_path / "again")
    result = tune(config, parse_space(SPACE), folder, clips=small_clips)
    assert result.released == "final" and audit_tuning(folder).passed
    # a final run deleted after it started: its rounds' sums were seen, so it never trains again
    state = json.loads((tmp_path / "again" / "tuning_state.json").read_text())
    state["final_started"] = True
    (tmp_path / "again" / "tuning_state.json").write_text(json.dumps(state))
    with pytest.raises(RunDirectoryError, match="final was removed after it started"):
        tune(config, parse_space(SPACE), tmp_path / "again", clips=small_clips)
    with pytest.raises(RunDirectoryError, match="pilot share"):  # another share: another run, never mixed
        tune(config, parse_space(SPACE), tmp_path / "again", clips=small_clips, pilot_share=0.5)


# --- the hostile review's attacks (issue 26) ---

def _rebind(folder):
    """Re-bind the tuning ledger's digests to the files as they are now (a forger's consistent edit)."""
    import hashlib

    path = folder / TUNING_LEDGER_FILE
    document = json.loads(path.read_text())
    for candidate in document["candidates"]:
        candidate["ledger_sha256"] = hashlib.sha256(
            (folder / candidate["run"] / "privacy_ledger.json").read_bytes()).hexdigest()
    if document["validation_ledger"]:
        document["validation_ledger_sha256"] = hashlib.sha256(
            (folder / document["validation_ledger"]).read_bytes()).hexdigest()
    path.write_text(json.dumps(document))


def _killed_after_the_first_candidate(tmp_path, small_clips):
    """A tuning run killed once candidate 0 is trained and scored: (its config, its directory)."""
    config, folder = small_config(*FAST), tmp_path / "run"

    def kill(candidate, score, test):
        raise _Killed

    with pytest.raises(_Killed):
        tune(config, parse_space(SPACE), folder, clips=small_clips, on_candidate=kill)
    return config, folder


def test_a_score_released_for_one_model_is_never_released_for_another(tmp_path, small_clips):
    config, folder = _killed_after_the_first_candidate(tmp_path, small_clips)
    state_path = folder / "tuning_state.json"
    state = json.loads(state_path.read_text())
    released = state["scores"].pop("0")  # as if killed after the release, before its score was recorded
    state_path.write_text(json.dumps(state))
    assert released
    shutil.copytree(folder, tmp_path / "retrained")
    # a release whose outcome the run does not know is not executed again (a second execution, over other
    # survivors, would be a second release)
    with pytest.raises(RunDirectoryError, match="release was interrupted"):
        tune(config, parse_space(SPACE), folder, clips=small_clips)
    # a started candidate's directory deleted: retraining it would release its rounds' sums again
    shutil.rmtree(tmp_path / "retrained" / "candidates" / "00")
    with pytest.raises(RunDirectoryError, match="removed after it started"):
        tune(config, parse_space(SPACE), tmp_path / "retrained", clips=small_clips)
    # the state lost while candidates exist: the releases made cannot be accounted, so nothing resumes
    (folder / "tuning_state.json").unlink()
    with pytest.raises(RunDirectoryError, match="cannot be accounted"):
        tune(config, parse_space(SPACE), folder, clips=small_clips)


def test_a_scored_candidate_retrained_is_refused(tmp_path, small_clips):
    import torch

    config, folder = _killed_after_the_first_candidate(tmp_path, small_clips)
    model = folder / "candidates" / "00" / "model.pt"  # another model in its place (as a retraining would leave)
    saved = torch.load(model, weights_only=True)
    saved["global"] = {k: v + 0.01 for k, v in saved["global"].items()}
    torch.save(saved, model)
    with pytest.raises(RunDirectoryError, match="released for another model"):
        tune(config, parse_space(SPACE), folder, clips=small_clips)


def test_validation_sums_assume_a_colluder_among_few_clients(tuned):
    folder, config, result = tuned
    plan = read_ledger(folder / "validation_ledger.json").phases["validation"]
    assert plan.clients == 4 and plan.colluders == 1 and plan.min_inputs - plan.colluders == 3


def test_numbers_are_numbers_and_one_run_is_charged_once():
    assert parse_space(["federation.server_lr=1e-2"]) == {"federation.server_lr": [0.01]}
    with pytest.raises(ConfigError, match="listed twice"):
        parse_space(["federation.server_lr=1e-2,0.01"])


def test_the_audit_flags_forged_validation_and_candidate_files(tuned, tmp_path):
    def overlap(folder):  # validation clients renamed to training clients, digests re-bound
        path = folder / "validation_ledger.json"
        document = json.loads(path.read_text())
        training = [e["client"] for e in json.loads((folder / "candidates/00/privacy_ledger.json").read_text())[
            "clients"]]
        for entry, client in zip(document["clients"], training):
            entry["client"] = client
        path.write_text(json.dumps(document))
        _rebind(folder)

    audit = _tampered(tuned, tmp_path / "a", overlap)
    assert MISMATCH in audit.verdicts and any("training clients too" in r for r in audit.reasons)

    def candidate_trust(folder):  # a candidate's config edited to assume no colluders
        path = folder / "candidates/01/config.yaml"
        path.write_text(path.read_text().replace("colluding_fraction: 0.1", "colluding_fraction: 0.0"))

    audit = _tampered(tuned, tmp_path / "b", candidate_trust)
    assert MISMATCH in audit.verdicts and any("not the candidate" in r for r in audit.reasons)

    audit = _tampered(tuned, tmp_path / "c", _edit_ledger(lambda d: d.update(target_epsilon=4.0)))
    assert MISMATCH in audit.verdicts and any("config.yaml's 3.0" in r for r in audit.reasons)

    def drop_candidate_everywhere(folder):  # a candidate and its directory removed, the space shrunk to match
        shutil.rmtree(folder / "candidates" / "01")
        path = folder / TUNING_LEDGER_FILE
        document = json.loads(path.read_text())
        document["candidates"] = document["candidates"][:1]
        document["space"] = {k: [v] for k, v in document["candidates"][0]["settings"].items()}
        document["candidates_declared"], document["chosen"] = 1, 0
        document["pilot_share"], document["final"] = 1.0, None  # one candidate has no pilots and no final run
        for entry in document["clients"]:
            entry["final"] = False
        shutil.rmtree(folder / "final")
        path.write_text(json.dumps(document))

    audit = _tampered(tuned, tmp_path / "d", drop_candidate_everywhere)
    assert any("each calibrated to" in r for r in audit.reasons)  # one candidate would have had the whole budget


def test_hostile_tuning_directories_are_refused_quickly(tuned, tmp_path):
    import os

    from privfer.privacy.ledger import LedgerError

    with pytest.raises(LedgerError, match="at most 16"):  # 16^8 candidates would be enumerated
        _tampered(tuned, tmp_path / "a", _edit_ledger(
            lambda d: d.update(space={key: list(range(16)) for key in TUNABLE[:8]})))
    with pytest.raises(LedgerError, match="space"):  # a trust setting is never a candidate's
        _tampered(tuned, tmp_path / "a2", _edit_ledger(
            lambda d: d.update(space={"aggregation.colluding_fraction": [0.0]})))

    def fifo(folder):  # a candidate ledger that would block a reader forever
        path = folder / "candidates/01/privacy_ledger.json"
        path.unlink()
        os.mkfifo(path)

    assert TAMPERED in _tampered(tuned, tmp_path / "b", fifo).verdicts

    def bad_config(folder):
        (folder / "config.yaml").write_text("federation: [x]\n")

    assert MISMATCH in _tampered(tuned, tmp_path / "c", bad_config).verdicts
    def huge_population(folder):  # a valid config whose synthetic data would take many GB to rebuild
        path = folder / "config.yaml"
        path.write_text(path.read_text().replace("actors: 48", "actors: 10000").replace("feature_dim: 128",
                                                                                         "feature_dim: 8192"))

    from privfer.privacy.audit import UNAUDITABLE

    assert UNAUDITABLE in _tampered(tuned, tmp_path / "e", huge_population).verdicts
    stray = _tampered(tuned, tmp_path / "d", lambda folder: (folder / "candidates" / ".DS_Store").write_text(""))
    assert stray.passed
