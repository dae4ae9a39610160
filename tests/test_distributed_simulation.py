"""privfer simulate under distributed DP: the ledger, the audit, resume, FedPer's personal layers, the defaults."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from conftest import small_config, spy_on_aggregate
from privfer.errors import ConfigError
from privfer.fl.rounds import TRAINING
from privfer.fl.simulation import prepare_federation, simulate
from privfer.auditing import audit_path
from privfer.privacy.audit import MISMATCH, OVER_BUDGET, LedgerError

FAST = ["federation.rounds=4", "federation.adaptation=false", "privacy.epsilon=3"]


def test_auto_mechanism_and_refused_combinations():
    assert small_config("privacy.epsilon=3").mechanism == "distributed"
    assert small_config("privacy.epsilon=3", "aggregation.backend=ckks").mechanism == "local"
    assert small_config("privacy.epsilon=3", "aggregation.backend=plain").mechanism == "local"
    assert small_config().mechanism is None
    with pytest.raises(ConfigError, match="approximate decryption"):
        small_config("privacy.epsilon=3", "privacy.mechanism=distributed", "aggregation.backend=ckks")
    with pytest.raises(ConfigError, match="aggregation.backend 'masking'"):
        small_config("privacy.epsilon=3", "privacy.mechanism=distributed", "aggregation.backend=plain")


def test_every_client_in_every_round_spends_its_budget_and_the_audit_agrees(tmp_path, small_clips):
    config = small_config(*FAST)
    result = simulate(config, tmp_path / "run", clips=small_clips)
    assert result.privacy.mechanism == "distributed" and result.privacy.accountant == "skellam_rdp"
    ledger = json.loads((tmp_path / "run" / "privacy_ledger.json").read_text())
    federation = prepare_federation(config, small_clips)
    assert ledger["mechanism_id"] == "distributed"
    assert ledger["delta"] <= 1 / (10 * len(federation.parts["train"]))
    plan = ledger["phases"]["training"]
    assert plan["min_inputs"] - plan["colluders"] >= 1 and plan["clients"] == len(federation.clients["training"])
    for entry in ledger["clients"]:
        assert entry["epsilon"] <= 3.0
        if entry["rounds_trained"] == 4:
            assert entry["epsilon"] >= 0.9 * 3.0
    report = audit_path(tmp_path / "run")
    assert report.passed, ([c.reasons for c in report.clients if c.reasons], report.run_checks)
    assert report.run_checks == []  # cross-checked against config.yaml and rounds.json, and consistent
    assert all(c.floor is not None and c.floor <= c.certified for c in report.clients)

    def restated(ledger):  # what the header restates, kept consistent: only the audit's recomputation can tell
        plan = ledger["phases"]["training"]
        plan["noise_multiplier"] = math.sqrt(plan["mu"]) / plan["l2"]
        spent = [entry["epsilon"] for entry in ledger["clients"]]
        ledger["epsilon_max"], ledger["epsilon_median"] = max(spent), statistics.median(spent)
        return json.dumps(ledger)

    tampered = json.loads((tmp_path / "run" / "privacy_ledger.json").read_text())
    tampered["clients"][0]["epsilon"] = 1.0
    tampered["phases"]["training"]["mu"] *= 4  # claims four times the noise the history was computed with
    (tmp_path / "t.json").write_text(restated(tampered))
    report = audit_path(tmp_path / "t.json")
    assert MISMATCH in report.clients[0].verdicts and not report.passed
    tampered["phases"]["training"]["noise_multiplier"] *= 2  # a plan that misstates its own noise: refused on load
    (tmp_path / "t.json").write_text(json.dumps(tampered))
    with pytest.raises(LedgerError, match="noise_multiplier"):
        audit_path(tmp_path / "t.json")

    over = json.loads((tmp_path / "run" / "privacy_ledger.json").read_text())
    over["clients"][1]["history"][0][0] /= 9  # a third of the noise in the history itself
    over["phases"]["training"]["mu"] /= 9
    over["phases"]["training"]["share_variance"] /= 9
    (tmp_path / "o.json").write_text(restated(over))
    report = audit_path(tmp_path / "o.json")
    assert OVER_BUDGET in report.clients[1].verdicts


@pytest.mark.parametrize("strategy", ["fedavg", "fedper"])  # fedper: the clients' head optimizers resume too
def test_resume_after_a_kill_ends_exactly_as_an_uninterrupted_run(tmp_path, small_clips, strategy):
    config = small_config(*FAST, "privacy.noise_source=run_seed", "federation.dropout=0.1",
                          f"federation.strategy={strategy}")
    whole = simulate(config, tmp_path / "whole", clips=small_clips)

    class Killed(Exception):
        pass

    def kill(record):
        if record.round == 2:
            raise Killed

    with pytest.raises(Killed):
        simulate(config, tmp_path / "resumed", clips=small_clips, on_round=kill)
    assert not (tmp_path / "resumed" / "result.json").exists()
    resumed = simulate(config, tmp_path / "resumed", clips=small_clips)
    assert resumed.test == whole.test
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert all(torch.equal(a["global"][k], b["global"][k]) for k in a["global"])
    assert set(a["personal"]) == set(b["personal"]) and (strategy == "fedavg") == (not a["personal"])
    for client, head in a["personal"].items():
        assert all(torch.equal(head[k], b["personal"][client][k]) for k in head)


def test_fedper_personal_layers_never_enter_any_message(monkeypatch, small_clips):
    config = small_config("federation.rounds=2", "privacy.epsilon=8", "federation.strategy=fedper",
                          "federation.adaptation=false")
    seen = spy_on_aggregate(monkeypatch)
    federation = prepare_federation(config, small_clips)
    from privfer.models.vfer import VFER

    template = VFER.from_config(config.model, small_clips.feature_dim, private=True)
    shared = federation.strategy.shared_names(template)
    personal = [n for n, _ in template.named_parameters() if n not in shared]
    assert personal
    shared_size = sum(p.numel() for n, p in template.named_parameters() if n in shared)
    result = simulate(config, None, clips=small_clips)
    integer_messages = [a for a in seen if a.dtype.kind in "iu"]  # the distributed rounds' contributions
    assert len(integer_messages) == 2 * len(federation.clients["training"])
    assert all(a.size == shared_size for a in integer_messages)
    assert result.privacy.mechanism == "distributed"


def test_the_model_learns_under_distributed_dp(small_clips):
    config = small_config("federation.rounds=10", "federation.adaptation=false", "privacy.epsilon=50")
    result = simulate(config, None, clips=small_clips)
    assert result.macro_f1 > 0.3  # chance is 1/6


@pytest.mark.parametrize("epsilon", [2.0, 50.0])
def test_the_canary_audit_never_certifies_more_than_the_claim(small_clips, epsilon):
    from privfer.auditing.empirical import run_canary_audit

    config = small_config("federation.rounds=6", f"privacy.epsilon={epsilon}")
    audit = run_canary_audit(config, canaries=400, guesses=60, clips=small_clips, delta=1e-5)
    assert audit.claimed_epsilon is not None and audit.epsilon_lower_bound <= audit.claimed_epsilon
    assert audit.steps == 6
    if epsilon >= 50:
        assert audit.correct >= 55  # with little noise the canaries are found: the audit has power, not only soundness
    with pytest.raises(ValueError, match="whitebox"):
        run_canary_audit(config, kind="blackbox", canaries=10, guesses=4, clips=small_clips)


def test_a_checkpoint_from_before_the_state_owners_resumes_with_its_optimizer_states():
    from privfer.fl.federation import RunState

    state = RunState(global_state={"w": torch.zeros(2)}, personal={}, accounts={})
    raw = state.to_checkpoint()
    adam = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    assert {"strategy_server", "strategy_clients", "mechanism_state"} <= set(raw)
    for key in ("strategy_server", "strategy_clients", "mechanism_state"):
        del raw[key]
    raw["server_optimizer"], raw["personal_optimizer"] = {"training": adam}, {"7": adam}  # as written before
    restored = RunState.from_checkpoint(raw)
    assert restored.strategy_server == {"training": adam}
    assert restored.mechanism_state == {"personal_optimizer": {7: adam}} and restored.strategy_clients == {}


def test_a_resume_under_other_noise_plans_is_refused(tmp_path, small_clips, monkeypatch):
    """A run killed under one calibration and resumed under another (e.g. another privfer) would account the rounds
    already released under the wrong plan: refused."""
    from privfer.errors import RunDirectoryError
    from privfer.fl import simulation as simulation_module

    config = small_config(*FAST)
    calls = {"n": 0}
    original = simulation_module._run_round

    def killed_after_one(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(simulation_module, "_run_round", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        simulate(config, tmp_path / "run", clips=small_clips)
    monkeypatch.setattr(simulation_module, "_run_round", original)
    from privfer.privacy import distributed as distributed_module

    monkeypatch.setattr(distributed_module, "colluders", lambda clients, fraction: 0)  # another calibration
    with pytest.raises(RunDirectoryError, match="other noise plans"):
        simulate(config, tmp_path / "run", clips=small_clips)
    monkeypatch.undo()
    assert simulate(config, tmp_path / "run", clips=small_clips).rounds.training == 4  # the same plans: resumes


def test_noise_shares_are_sized_for_the_colluders_of_the_population_not_the_round(small_clips):
    """The server picks each round's clients, so it could gather every colluding client of the federation into one
    round: a round of 8 of 36 training clients is sized for floor(0.1 x 36) = 3 colluders, not 1."""
    plan = prepare_federation(small_config(*FAST, "federation.clients_per_round=8"), small_clips).plans[TRAINING]
    assert plan.clients == 8 and plan.colluders == 3 and plan.min_inputs - plan.colluders == 5
    everyone = prepare_federation(small_config(*FAST), small_clips).plans[TRAINING]
    assert everyone.clients == 36 and everyone.colluders == 3  # a round of the whole population: the same count
