"""privfer audit: independent accountants on a ledger, verdicts, exit codes, and the one-run estimator."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from privfer.cli import app
from privfer.fl.simulation import simulate
from privfer.auditing import audit_path
from privfer.privacy.audit import MISMATCH, NO_DP, OVER_BUDGET, WEAK_DELTA, LedgerError, load_ledger
from privfer.privacy.ledger import SCHEMA
from privfer.privacy.one_run import ceiling, epsilon_lower_bound, p_value
from tests.conftest import small_config

runner = CliRunner()


def ledger(history, *, delta=1e-5, records=1000, claimed=None, target=2.0, accountant="prv", **entry):
    """A complete local ledger of one client (every field the writer writes)."""
    from privfer.privacy.calibrate import epsilon_spent
    from privfer.privacy.mechanisms.local import MECHANISM

    stated = MECHANISM.ledger_statement()
    if claimed is None and all(0 < h[1] <= 1 for h in history):  # a private ledger states every entry's epsilon
        claimed = epsilon_spent([tuple(h) for h in history], delta, accountant)
    return {
        "schema": SCHEMA,
        "mechanism_id": "local",
        "unit": "record",
        "mechanism": stated["mechanism"],
        "private": True,
        "accountant": accountant,
        "target_epsilon": target,
        "delta": delta,
        "max_grad_norm": 1.0,
        "noise_source": "os",
        "neighbouring_relation": stated["neighbouring_relation"],
        "public": stated["public"],
        "not_covered": [],
        "epsilon_max": claimed,
        "epsilon_median": claimed,
        "clients": [
            {
                "client": 7,
                "phase": "training",
                "records": records,
                "noise_multiplier": history[0][0],
                "sample_rate": history[0][1],
                "history": history,
                "steps": sum(h[2] for h in history),
                "rounds_trained": 1,
                "max_rounds": 1,
                "delta": delta,
                "epsilon": claimed,
                "accountant": accountant,
                **entry,
            }
        ],
    }


def write(tmp_path, content) -> str:
    path = tmp_path / "privacy_ledger.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(tmp_path)


def test_accountants_match_the_published_cross_check_values(tmp_path):
    # REFERENCES.md: q = 0.01, sigma = 1.0, 1000 steps, delta = 1e-5: RDP 2.101, PLD / PRV about 1.83.
    report = audit_path(write(tmp_path, ledger([[1.0, 0.01, 1000]], claimed=1.83)))
    values = report.clients[0].values
    assert values["opacus_rdp"] == pytest.approx(2.101, abs=0.01)
    assert values["dp_accounting_rdp"] == pytest.approx(2.101, abs=0.01)
    assert values["opacus_prv"] == pytest.approx(1.83, abs=0.05)
    assert values["dp_accounting_pld"] == pytest.approx(1.83, abs=0.05)
    # RDP above the target of 2 is expected; the tightest sound bound certifies it.
    assert report.passed, report.clients[0].reasons


@pytest.mark.parametrize(
    ("q", "sigma", "steps", "delta", "rdp", "tight"),
    [(0.00427, 1.1, 14062, 1e-5, 2.597, 2.38), (0.032, 1.0, 625, 1e-4, 4.952, 4.39)],
)
def test_more_cross_check_values(tmp_path, q, sigma, steps, delta, rdp, tight):
    report = audit_path(write(tmp_path, ledger([[sigma, q, steps]], delta=delta, target=None)))
    values = report.clients[0].values
    assert values["dp_accounting_rdp"] == pytest.approx(rdp, abs=0.02)
    assert values["dp_accounting_pld"] == pytest.approx(tight, abs=0.06)


def test_a_tampered_ledger_is_over_budget_and_the_command_exits_1(tmp_path):
    honest = ledger([[1.0, 0.01, 1000]], claimed=1.83)
    tampered = ledger([[0.7, 0.01, 1000]], claimed=1.83)  # less noise than the claim needs
    assert audit_path(write(tmp_path, honest)).passed
    folder = write(tmp_path, tampered)
    report = audit_path(folder)
    assert OVER_BUDGET in report.clients[0].verdicts and MISMATCH in report.clients[0].verdicts
    result = runner.invoke(app, ["audit", folder])
    assert result.exit_code == 1 and "OVER BUDGET" in result.stdout and "FAIL" in result.stdout
    as_json = runner.invoke(app, ["audit", folder, "--json"])
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["verdicts"]["OVER BUDGET"] == 1


def test_fields_that_contradict_the_history_are_a_mismatch(tmp_path):
    entry = ledger([[1.0, 0.01, 1000]], claimed=1.83)
    entry["clients"][0]["noise_multiplier"] = 1.5  # says more noise than the history holds
    report = audit_path(write(tmp_path, entry))
    assert report.clients[0].verdicts == [MISMATCH]


def test_a_delta_of_one_over_the_records_is_weak(tmp_path):
    report = audit_path(write(tmp_path, ledger([[1.0, 0.5, 10]], delta=0.01, records=100,
                                                             target=None)))
    assert WEAK_DELTA in report.clients[0].verdicts


def test_local_noise_drawn_from_the_public_run_seed_is_public_noise(tmp_path):
    """A local DP-SGD run whose noise comes from the run seed passes no audit, as under distributed DP."""
    from privfer.privacy.audit import PUBLIC_NOISE

    public = ledger([[1.0, 0.5, 10]], target=100.0)
    public["noise_source"] = "run_seed"
    report = audit_path(write(tmp_path, public))
    assert report.clients[0].verdicts == [PUBLIC_NOISE] and not report.passed
    assert "recompute" in " ".join(report.clients[0].reasons)
    (tmp_path / "secret").mkdir()
    secret = audit_path(write(tmp_path / "secret", ledger([[1.0, 0.5, 10]], target=100.0)))
    assert secret.clients[0].verdicts == [] and secret.passed


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not readable JSON"),
        ({"schema": "other/9"}, "field 'schema' is 'other/9'"),
        ({"schema": SCHEMA, "mechanism_id": "local", "unit": "record", "accountant": "prv", "delta": 1e-5,
          "private": True},
         "the ledger lacks the field 'mechanism'"),
        ("HISTORY", "clients[0] field 'history[0]' must be"),
        ("NO-HISTORY", "clients[0] lacks the field 'history'"),
        ("STRING-SIGMA", "clients[0] field 'noise_multiplier' must be a number, got '1.0'"),
    ],
)
def test_a_corrupt_ledger_is_one_line_and_exit_2(tmp_path, content, message):
    if content == "HISTORY":
        content = ledger([[1.0, 2.0, 10]], sample_rate=0.1)
    elif content == "STRING-SIGMA":
        content = ledger([[1.0, 0.1, 10]], noise_multiplier="1.0")
    elif content == "NO-HISTORY":
        content = ledger([[1.0, 0.1, 10]])
        del content["clients"][0]["history"]
    folder = write(tmp_path, content)
    result = runner.invoke(app, ["audit", folder])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "privacy_ledger.json" in lines[0] and message in lines[0], result.stderr
    missing = runner.invoke(app, ["audit", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


def test_a_real_run_passes_its_audit(small_clips, tmp_path):
    config = small_config("privacy.epsilon=3", "federation.rounds=2", "federation.clients_per_round=3",
                          "aggregation.backend=plain", "privacy.accountant=rdp", "output.save_model=false")
    simulate(config, tmp_path, clips=small_clips)
    report = audit_path(tmp_path)
    assert report.passed and len(report.clients) >= 3
    result = runner.invoke(app, ["audit", str(tmp_path), "--per-client"])
    assert result.exit_code == 0 and "PASS" in result.stdout


# -- the one-run estimator (Steinke, Nasr, Jagielski 2023) ---------------------------------------------------


@pytest.mark.parametrize(("r", "zero_delta", "with_delta"), [(10, 1.05, 1.01), (50, 2.78, 2.76), (100, 3.49, 3.47),
                                                             (500, 5.11, 5.09)])
def test_one_run_ceiling_matches_the_papers_values(r, zero_delta, with_delta):
    assert ceiling(1000, r, 0.0) == pytest.approx(zero_delta, abs=0.01)
    assert ceiling(1000, r, 1e-5) == pytest.approx(with_delta, abs=0.01)


def test_one_run_bound_is_zero_at_chance_and_grows_with_correct_guesses():
    assert epsilon_lower_bound(1000, 100, 50) == 0.0  # coin-flip accuracy certifies nothing
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5) for v in (60, 75, 90, 100)]
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1] == pytest.approx(3.47, abs=0.01)
    eps = bounds[2]
    assert p_value(eps, 1000, 100, 90, 1e-5) == pytest.approx(0.05, abs=1e-3)  # the bound sits at p = 0.05
    assert p_value(eps * 0.9, 1000, 100, 90, 1e-5) < 0.05 < p_value(eps * 1.1, 1000, 100, 90, 1e-5)


# -- empirical canary audit ----------------------------------------------------------------------------------

AUDIT = ("federation.rounds=3", "privacy.accountant=rdp")


@pytest.mark.parametrize("epsilon", [1.0, 4.0])
def test_the_canary_audit_never_certifies_more_than_the_claim(small_clips, epsilon):
    from privfer.auditing.empirical import run_canary_audit

    for seed in range(3):
        result = run_canary_audit(small_config(*AUDIT, f"privacy.epsilon={epsilon}"), seed=seed, clips=small_clips)
        assert result.claimed_epsilon is not None and result.noise_multiplier > 0
        assert result.epsilon_lower_bound <= result.claimed_epsilon, result


@pytest.mark.parametrize("kind", ["whitebox", "blackbox"])
def test_without_dp_the_canary_audit_has_power(small_clips, kind):
    from privfer.auditing.empirical import run_canary_audit

    bounds = [run_canary_audit(small_config(*AUDIT), kind=kind, seed=seed, clips=small_clips).epsilon_lower_bound
              for seed in range(2)]
    assert min(bounds) > 1.0, bounds


def test_the_empirical_command_prints_the_ceiling_first_and_plots(small_clips, tmp_path):
    from privfer.cli.audit import DEPRECATED
    from tests.test_cli import SETS

    plot = tmp_path / "audit.png"
    result = runner.invoke(app, ["canary-audit", "--sweep", "2,inf", "--canaries", "200", "--guesses", "40",
                                 *SETS, "--set", "federation.rounds=2", "--set", "privacy.accountant=rdp",
                                 "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("200 canaries, 40 guesses, delta 1e-05: the largest lower bound")
    assert "PASS" in result.stdout and "inf (DP off)" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = runner.invoke(app, ["canary-audit", "--guesses", "3"])
    assert bad.exit_code == 2 and "even" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    old = runner.invoke(app, ["audit", "--empirical", "--guesses", "3"])  # the old spelling still works, and says so
    assert old.exit_code == 2 and old.stderr.splitlines()[0] == DEPRECATED and "even" in old.stderr
    plain = runner.invoke(app, ["audit", "--help"])
    assert "--canaries" not in plain.stdout  # the theoretical audit's help shows its own options only


def test_a_million_step_ledger_is_audited_by_rdp_within_bounds(tmp_path):
    """The 10^6-step entry that once asked PRV for 79 GB: the tight accountants are skipped by cost, RDP decides."""
    report = audit_path(write(tmp_path, ledger([[0.6, 0.1, 1_000_000]], claimed=1.0)))
    client = report.clients[0]
    assert set(client.values) == {"opacus_rdp", "dp_accounting_rdp"}
    assert client.certified > 1000 and OVER_BUDGET in client.verdicts and MISMATCH in client.verdicts
    assert any("PRV and PLD skipped" in reason for reason in client.reasons)
    result = runner.invoke(app, ["audit", str(tmp_path)])
    assert result.exit_code == 1 and "FAIL" in result.stdout


def test_an_entry_beyond_the_audit_bound_is_unauditable_exit_2(tmp_path):
    from privfer.privacy.audit import UNAUDITABLE

    folder = write(tmp_path, ledger([[1.0, 0.1, 10**12]], claimed=1.0))
    report = audit_path(folder)
    assert report.clients[0].verdicts == [UNAUDITABLE] and not report.passed
    result = runner.invoke(app, ["audit", folder])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "UNAUDITABLE" in lines[0], result.stderr


def test_prv_beyond_its_cost_bounds_reports_the_rdp_bound():
    from privfer.privacy.calibrate import PRV_MAX_STEPS, calibrate_noise, epsilon_spent, prv_affordable

    cheap = [(1.0, 0.01, 1000)]
    assert prv_affordable(cheap, 1e-5) and epsilon_spent(cheap, 1e-5, "prv") < epsilon_spent(cheap, 1e-5, "rdp")
    for costly in ([(0.3, 0.5, 200)], [(5.0, 0.01, PRV_MAX_STEPS + 1)]):
        assert not prv_affordable(costly, 1e-5)
        assert epsilon_spent(costly, 1e-5, "prv") == epsilon_spent(costly, 1e-5, "rdp")
    # the largest budget the config allows calibrates without PRV's grid ever being sized by it
    sigma = calibrate_noise(1000.0, 1e-4, 0.1, 200, "prv")
    assert 0.05 <= sigma < 0.5 and epsilon_spent([(sigma, 0.1, 200)], 1e-4, "prv") <= 1000.0


@pytest.mark.parametrize("value", ["nan", "-inf", "0", "1e8", "1e308"])
def test_an_absurd_budget_is_a_config_error_naming_the_range(value):
    from privfer.config import load_config
    from privfer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"privacy.epsilon.*must be in \(0, 1000\]"):
        load_config(None, [f"privacy.epsilon={value}"])


def _restate(ledger):
    """The header's summary of the entries' epsilons, as the writer states it: the edit stays self-consistent."""
    import statistics

    spent = [e["epsilon"] for e in ledger["clients"] if e["epsilon"] is not None]
    ledger["epsilon_max"] = max(spent) if spent else None
    ledger["epsilon_median"] = statistics.median(spent) if spent else None


def _tamper_cases():
    from privfer.privacy.calibrate import epsilon_spent

    def lower_consistently(ledger, field):
        targets = ledger["clients"] if field == "delta" else [max(ledger["clients"], key=lambda e: e["steps"])]
        if field == "delta":
            ledger["delta"] *= 10
        for entry in targets:
            if not entry["history"]:
                continue
            sigma, q, steps = entry["history"][0]
            assert steps > 1 or field == "delta"
            if field == "sample_rate":
                q = q / 2
                entry["sample_rate"] = q
            elif field == "steps":
                steps = steps - 1
                entry["steps"] = steps
            else:
                entry["delta"] = ledger["delta"]
            entry["history"] = [[sigma, q, steps]]
            entry["epsilon"] = epsilon_spent([(sigma, q, steps)], entry["delta"], ledger["accountant"])

    return {
        "delete an entry": lambda ledger: ledger["clients"].pop(0),
        "delete every entry": lambda ledger: ledger["clients"].clear(),
        "duplicate an entry": lambda ledger: ledger["clients"].append(dict(ledger["clients"][0])),
        "raise the target": lambda ledger: ledger.update(target_epsilon=ledger["target_epsilon"] * 2),
        "lower the sample rate": lambda ledger: lower_consistently(ledger, "sample_rate"),
        "lower the steps": lambda ledger: lower_consistently(ledger, "steps"),
        "raise delta": lambda ledger: lower_consistently(ledger, "delta"),
        "change rounds_trained": lambda ledger: ledger["clients"][0].update(
            rounds_trained=ledger["clients"][0]["rounds_trained"] + 1),
    }


def test_a_ledger_whose_unit_is_not_its_mechanisms_is_refused_on_load(audited_run, tmp_path):
    from privfer.privacy.audit import LedgerError

    content = json.loads((audited_run / "privacy_ledger.json").read_text())
    for unit in ("user", "person"):  # a local (record-level) ledger relabelled
        (tmp_path / "ledger.json").write_text(json.dumps({**content, "unit": unit}))
        with pytest.raises(LedgerError, match="field 'unit'"):
            load_ledger(tmp_path / "ledger.json")
        result = runner.invoke(app, ["audit", str(tmp_path / "ledger.json")])
        assert result.exit_code == 2 and "field 'unit'" in result.output


@pytest.fixture(scope="module")
def audited_run(small_clips, tmp_path_factory):
    folder = tmp_path_factory.mktemp("audited-run")
    config = small_config("privacy.epsilon=3", "federation.rounds=2", "federation.clients_per_round=3",
                          "aggregation.backend=plain", "privacy.accountant=rdp", "output.save_model=false",
                          "privacy.delta=1e-4", "training.batch_size=4")
    simulate(config, folder, clips=small_clips)
    return folder


@pytest.mark.parametrize("case", sorted(_tamper_cases()))
def test_a_ledger_edited_to_stay_self_consistent_fails_against_its_run(audited_run, tmp_path, case):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(audited_run, run_dir)
    assert audit_path(run_dir).passed  # the untouched run passes
    path = run_dir / "privacy_ledger.json"
    content = json.loads(path.read_text())
    _tamper_cases()[case](content)
    _restate(content)
    path.write_text(json.dumps(content))
    report = audit_path(run_dir)
    assert not report.passed, case
    result = runner.invoke(app, ["audit", str(run_dir)])
    assert result.exit_code == 1, (case, result.output)
    # the same ledger alone is audited as before and says it was not cross-checked
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(path, alone / "privacy_ledger.json")
    assert audit_path(alone).run_checks is None
    assert "not cross-checked" in runner.invoke(app, ["audit", str(alone)]).stdout


# -- forged headers (hostile review of the audit's split) -----------------------------------------------------------


def _person_ledger():
    from privfer.privacy import recipe

    plan = recipe.plan_run(epsilon=3.0, delta=1e-4, rounds=4, clients=20, dimension=50)
    run = recipe.RunLedger()
    for _ in range(4):
        run.record(range(20))
    return recipe.ledger(plan, run, persons=40).document()


def test_forged_headers_are_ledger_errors_on_every_path(tmp_path):
    from privfer.auditing import audit_ledger as audit_with_run
    from privfer.privacy.audit import audit_ledger_alone as audit_alone

    document = _person_ledger()
    for audit_ledger in (audit_alone, audit_with_run):
        assert audit_ledger(json.loads(json.dumps(document)), tmp_path / "l.json").passed
    forgeries = {
        "no unit": lambda d: d.pop("unit"),
        "person relabelled record": lambda d: d.update(unit="record"),
        "target as text": lambda d: d.update(target_epsilon="3"),
        "target NaN": lambda d: d.update(target_epsilon=float("nan")),
        "steps as a list": lambda d: d["clients"][0].update(steps=[1]),
        "epsilon NaN": lambda d: d["clients"][0].update(epsilon=float("nan")),
        "mechanism as a list": lambda d: d.update(mechanism_id=["distributed"]),
    }
    for name, forge in forgeries.items():
        forged = json.loads(json.dumps(document))
        forge(forged)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(forged))
        with pytest.raises(LedgerError):
            audit_path(path)
        for audit_ledger in (audit_alone, audit_with_run):
            with pytest.raises(LedgerError):
                audit_ledger(forged, path)  # a document load_ledger never saw


def test_a_run_without_dp_writes_a_ledger_its_audit_reads_at_either_unit(tmp_path):
    from privfer.privacy.ledger import ClientAccount, build_ledger

    from privfer.privacy.ledger.opacus import NO_DP_RELATION, TRAINED_LOCALLY
    from privfer.privacy.mechanisms.local import MECHANISM

    accounts = [ClientAccount(1, "training", 10, None, 0.1)]
    document = build_ledger(accounts, target_epsilon=None, delta=1e-3, accountant="prv", max_grad_norm=1.0,
                            noise_source="os", max_rounds={"training": 1}, unit="person",
                            trained_by=TRAINED_LOCALLY).document()
    # it says it protects nothing, not DP-SGD's noise and neighbouring relation
    assert document["mechanism"].startswith(f"none: trained without DP ({TRAINED_LOCALLY})")
    assert document["neighbouring_relation"] == NO_DP_RELATION and "Gaussian" not in json.dumps(document)
    path = tmp_path / "privacy_ledger.json"
    path.write_text(json.dumps(document))
    report = audit_path(path)
    assert not report.private and report.clients[0].verdicts == [NO_DP]
    # a ledger without DP written before it said so (local DP-SGD's sentences, private false) still reads
    stated = MECHANISM.ledger_statement()
    path.write_text(json.dumps({**document, "mechanism": stated["mechanism"],
                                "neighbouring_relation": stated["neighbouring_relation"]}))
    assert audit_path(path).clients[0].verdicts == [NO_DP]
    # but no ledger without DP may claim a protection, nor mix the two wordings
    for field, value in (("neighbouring_relation", stated["neighbouring_relation"]),
                         ("mechanism", "none, really: Gaussian noise"),
                         ("mechanism", document["mechanism"].replace(")", "); every person is protected at eps 1"))):
        _refused(tmp_path, {**document, field: value}, "field '(neighbouring_relation|mechanism)'")
    with pytest.raises(ValueError, match="says how the run trained"):
        build_ledger(accounts, target_epsilon=None, delta=1e-3, accountant="prv", max_grad_norm=1.0,
                     noise_source="os", max_rounds={"training": 1})
    with pytest.raises(ValueError, match="trained_by must be one of"):
        build_ledger(accounts, target_epsilon=None, delta=1e-3, accountant="prv", max_grad_norm=1.0,
                     noise_source="os", max_rounds={"training": 1}, trained_by="DP-FedAvg with Gaussian noise")


def test_the_summary_keeps_the_auditors_column_order(tmp_path):
    report = audit_path(write(tmp_path, ledger([[1.0, 0.5, 10]])))
    shown = [name for name in report.summary() if name not in ("claimed", "gaussian_floor")]
    assert shown == [name for name in report.columns if name in shown] and len(shown) == 4
    assert report.columns[:2] == ("opacus_rdp", "opacus_prv")


# -- the typed ledger: what the model refuses on load, and what it keeps ------------------------------------------


def _refused(tmp_path, document, match, name="forged.json"):
    path = tmp_path / name
    path.write_text(json.dumps(document))
    with pytest.raises(LedgerError, match=match):
        load_ledger(path)
    result = runner.invoke(app, ["audit", str(path)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output


def test_a_header_that_contradicts_its_entries_is_refused_on_load(audited_run, tmp_path):
    original = json.loads((audited_run / "privacy_ledger.json").read_text())
    forged = json.loads(json.dumps(original))
    forged["epsilon_max"] /= 2  # the summary understates the entries
    _refused(tmp_path, forged, "field 'epsilon_max'")
    forged = json.loads(json.dumps(original))
    forged["delta"] *= 10  # the run's delta raised above the entries' (a weaker delta judged, WEAK DELTA hidden)
    _refused(tmp_path, forged, r"clients\[0\] field 'delta'")
    forged = json.loads(json.dumps(original))
    forged["clients"][0]["note"] = "audited by hand"  # a field the schema does not define
    _refused(tmp_path, forged, r"clients\[0\] field 'note' is not a field")
    forged = json.loads(json.dumps(original))
    del forged["clients"][0]["max_rounds"]  # every field the writer writes is required
    _refused(tmp_path, forged, r"clients\[0\] lacks the field 'max_rounds'")
    forged = json.loads(json.dumps(original))
    forged["clients"][0]["steps"] = True  # a boolean is not a count
    _refused(tmp_path, forged, r"clients\[0\] field 'steps' must be a whole number")


def test_a_distributed_ledger_relabelled_legacy_is_refused(tmp_path):
    document = _person_ledger()
    relabelled = {**document, "schema": "privfer.privacy_ledger/1"}
    _refused(tmp_path, relabelled, "predates it")
    del relabelled["mechanism_id"]  # read as a local ledger, its plans and entries are not one
    _refused(tmp_path, relabelled, r"field 'unit'|clients\[0\]|is not a field|lacks the field")


def test_a_person_level_entry_that_states_records_is_refused(tmp_path):
    document = _person_ledger()
    document["clients"][0]["records"] = 2  # a person's clip count enters no released quantity: it is not written
    _refused(tmp_path, document, r"clients\[0\] field 'records'")


def test_a_local_entry_with_inflated_records_fails_against_its_run(audited_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(audited_run, run_dir)
    content = json.loads((run_dir / "privacy_ledger.json").read_text())
    largest = max(content["clients"], key=lambda e: e["records"])
    largest["records"] *= 2  # a stronger delta judged (delta < 1 / records); the history left as it was
    (run_dir / "privacy_ledger.json").write_text(json.dumps(content))
    report = audit_path(run_dir)
    assert not report.passed and any("sample rate" in problem for problem in report.run_checks), report.run_checks


@pytest.mark.slow
def test_a_run_with_the_default_delta_holds_delta_to_the_records(small_clips, tmp_path):
    config = small_config("privacy.epsilon=3", "federation.rounds=1", "federation.clients_per_round=3",
                          "aggregation.backend=plain", "privacy.accountant=rdp", "output.save_model=false",
                          "training.batch_size=4")
    simulate(config, tmp_path / "run", clips=small_clips)
    assert audit_path(tmp_path / "run").passed
    path = tmp_path / "run" / "privacy_ledger.json"
    content = json.loads(path.read_text())
    content["delta"] *= 10
    for entry in content["clients"]:  # a consistent rewrite at a 10x weaker delta
        entry["delta"] = content["delta"]
        entry["epsilon"] = recompute_claim(entry)
    _restate(content)
    path.write_text(json.dumps(content))
    report = audit_path(tmp_path / "run")
    assert not report.passed and any("delta" in problem and "run's data" in problem for problem in report.run_checks), \
        report.run_checks


def recompute_claim(entry):
    from privfer.privacy.calibrate import epsilon_spent

    return epsilon_spent([tuple(h) for h in entry["history"]], entry["delta"], "rdp") if entry["history"] else 0.0


def test_a_ledger_read_and_written_again_is_the_same_document(audited_run, tmp_path):
    from privfer.privacy.ledger import parse_ledger, read_ledger, write_ledger

    for document in (json.loads((audited_run / "privacy_ledger.json").read_text()), _person_ledger()):
        ledger = parse_ledger(json.loads(json.dumps(document)))
        assert ledger.document() == document
        write_ledger(tmp_path / "again.json", ledger)
        assert json.loads((tmp_path / "again.json").read_text()) == document
        assert read_ledger(tmp_path / "again.json") == ledger
    with pytest.raises(TypeError):
        write_ledger(tmp_path / "raw.json", document)  # only a validated ledger is written


def test_a_legacy_local_ledger_is_still_read(audited_run, tmp_path):
    content = json.loads((audited_run / "privacy_ledger.json").read_text())
    del content["mechanism_id"]
    content["schema"] = "privfer.privacy_ledger/1"
    (tmp_path / "privacy_ledger.json").write_text(json.dumps(content))
    report = audit_path(tmp_path)
    assert report.passed and report.run_checks is None


# -- hostile review of the typed ledger: bounded work, clean refusals, forgeries the run exposes ------------------


def test_hostile_documents_are_one_line_refusals_with_bounded_work(tmp_path):
    import sys

    base = json.loads(json.dumps(_person_ledger()))
    cases = {
        "a million empty entries": (lambda: json.dumps({**base, "clients": [{}] * 200_000}), r"clients\[0\]"),
        "a null noise family": (lambda: json.dumps({**base, "noise": None}), "'noise'"),
        "an empty noise family": (lambda: json.dumps({**base, "noise": ""}), "'noise'"),
        "a delta of 10**400": (lambda: json.dumps({**base, "delta": 10**400}), "'delta'"),
        "a 5000-digit integer": (lambda: json.dumps(base).replace('"persons": 40', '"persons": ' + "9" * 5000),
                                 "readable JSON"),
        "nesting deeper than the parser goes": (lambda: "[" * (sys.getrecursionlimit() * 20) + "]" *
                                                (sys.getrecursionlimit() * 20), "readable JSON"),
        "a duplicated key": (lambda: json.dumps(base)[:-1] + ', "persons": 4000}', "appears twice"),
        "a 50 MB schema": (lambda: json.dumps({**base, "schema": "x" * 50_000_000}), "field 'schema'"),
    }
    for name, (make, match) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(make())
        with pytest.raises(LedgerError, match=match) as refused:
            load_ledger(path)
        assert len(str(refused.value)) < 400, name  # a hostile field is never echoed whole
        result = runner.invoke(app, ["audit", str(path)])
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, (name, result.output[:300])


def test_forged_distributed_entries_and_statements_are_refused(tmp_path):
    original = _person_ledger()
    forgeries = {
        "fewer steps than rounds": (lambda d: d["clients"][0]["history"][0].__setitem__(-1, 1), "rounds"),
        "no history for a client that trained": (lambda d: d["clients"][0].update(history=[]), "rounds"),
        "steps that are not its rounds": (lambda d: d["clients"][0].update(steps=1), "'steps'"),
        "an accountant of no family": (lambda d: d["clients"][0].update(accountant="none"), "'accountant'"),
        "a trust section rewritten": (lambda d: d["trust"].update(server="trusted"), "'trust'"),
        "a mechanism sentence edited": (lambda d: d.update(mechanism="stronger than it is"), "'mechanism'"),
        "a plan without its family": (lambda d: d["phases"]["training"].update(noise=None), "'noise'"),
    }
    for name, (forge, match) in forgeries.items():
        forged = json.loads(json.dumps(original))
        forge(forged)
        _refused(tmp_path, forged, match, name=f"{name}.json")


def test_a_local_entry_with_an_unknown_accountant_is_refused(audited_run, tmp_path):
    content = json.loads((audited_run / "privacy_ledger.json").read_text())
    for entry in content["clients"]:
        entry["accountant"], entry["epsilon"] = "none", 0.01  # a claim no accountant is asked to confirm
    _restate(content)
    _refused(tmp_path, content, r"clients\[0\] field 'accountant'")


def test_the_noise_source_and_what_is_not_covered_are_held_to_the_run(audited_run, tmp_path):
    import shutil

    for edit, problem in ((lambda d: d.update(noise_source="os" if d["noise_source"] != "os" else "run_key"),
                           "noise source"),
                          (lambda d: d.update(not_covered=[]), "not_covered")):
        run_dir = tmp_path / problem.replace(" ", "_")
        shutil.copytree(audited_run, run_dir)
        content = json.loads((run_dir / "privacy_ledger.json").read_text())
        if problem == "not_covered" and not content["not_covered"]:
            content["not_covered"] = ["nothing"]  # the run covers everything: a ledger that says otherwise
        else:
            edit(content)
        (run_dir / "privacy_ledger.json").write_text(json.dumps(content))
        report = audit_path(run_dir)
        assert not report.passed and any(problem in line for line in report.run_checks), report.run_checks


def test_a_history_the_accountants_cannot_evaluate_is_unauditable_not_a_crash(tmp_path):
    from privfer.privacy.audit import UNAUDITABLE

    report = audit_path(write(tmp_path, ledger([[1e-300, 0.5, 10]], claimed=1.0)))
    assert report.clients[0].verdicts == [UNAUDITABLE] and not report.passed


def test_a_record_count_of_zero_is_a_finding_not_a_crash(audited_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(audited_run, run_dir)
    content = json.loads((run_dir / "privacy_ledger.json").read_text())
    for entry in content["clients"]:
        entry["records"] = 0
    (run_dir / "privacy_ledger.json").write_text(json.dumps(content))
    report = audit_path(run_dir)
    assert not report.passed and any("is not a count" in line for line in report.run_checks)


def test_noise_and_records_edited_consistently_fail_against_the_runs_data(audited_run, tmp_path):
    """The ledger recomputes after these edits (its entries agree with themselves); the run's data and its
    calibrated plans, rebuilt from config.yaml, do not."""
    import shutil

    from privfer.privacy.calibrate import epsilon_spent

    def more_noise(ledger):  # twice the noise multiplier claimed, so a smaller epsilon
        for entry in ledger["clients"]:
            entry["noise_multiplier"] *= 2
            entry["history"] = [[s * 2, q, t] for s, q, t in entry["history"]]
            entry["epsilon"] = epsilon_spent([tuple(h) for h in entry["history"]], entry["delta"],
                                             ledger["accountant"]) if entry["history"] else 0.0

    def fewer_records(ledger):  # a client's records lowered (its sample rate left as it was)
        ledger["clients"][0]["records"] -= 1

    for edit, problem in ((more_noise, "noise_multiplier"), (fewer_records, "records")):
        run_dir = tmp_path / problem
        shutil.copytree(audited_run, run_dir)
        content = json.loads((run_dir / "privacy_ledger.json").read_text())
        edit(content)
        _restate(content)
        (run_dir / "privacy_ledger.json").write_text(json.dumps(content))
        alone = tmp_path / f"{problem}-alone"
        alone.mkdir()
        shutil.copy(run_dir / "privacy_ledger.json", alone / "privacy_ledger.json")
        assert not any(MISMATCH in c.verdicts for c in audit_path(alone).clients)  # self-consistent
        report = audit_path(run_dir)
        assert not report.passed and any(problem in line and "run's data" in line for line in report.run_checks), \
            report.run_checks
