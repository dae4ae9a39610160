"""A run without DP on the distributed line is distributed DP-SGD with the noise taken out: the same model, steps,
clipping, server optimizer and secure sum — the ceiling of its private runs, not another algorithm (issue 26)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import small_config
from privfer.errors import ConfigError
from privfer.fl import mechanisms
from privfer.fl.mechanisms import NoDP, NoiselessFedAvg, NoiselessSGD, make_mechanism
from privfer.fl.rounds import TRAINING
from privfer.fl.simulation import prepare_federation, simulate
from privfer.models.clipped_sums import clipped_gradient_sums
from privfer.privacy.audit import NO_DP
from privfer.privacy.ledger.opacus import NO_DP_RELATION
from privfer.privacy.distributed import NOISELESS, encode_contribution, noise_generator, noiseless_plan

FAST = ["federation.rounds=3", "federation.adaptation=false", "output.save_model=false"]


def test_a_run_without_dp_takes_its_lines_algorithm_and_defaults():
    free, private = small_config(), small_config("privacy.epsilon=8")
    assert free.algorithm == private.algorithm == "distributed" and free.mechanism is None
    assert isinstance(make_mechanism(free), NoiselessSGD)
    for field in ("rounds", "clients_per_round", "server_optimizer"):
        assert getattr(free.federation, field) == getattr(private.federation, field)
    assert (free.model.readout, free.model.shortcut, free.model.recurrent) == ("both", True, "fast_dp")
    # D = 128: 0.02 x (256 / D)^(1/3) with DP, 0.01 x sqrt(256 / D) without (Adam without noise; the measured rules)
    assert private.federation.server_lr == pytest.approx(0.02 * 2 ** (1 / 3))
    assert free.federation.server_lr == pytest.approx(0.01 * 2 ** 0.5)
    # Person level: distributed DP-FedAvg's rounds, model and defaults without the noise.
    person, person_private = small_config("privacy.unit=person"), small_config("privacy.unit=person",
                                                                                "privacy.epsilon=8")
    assert person.algorithm == "distributed" and person.mechanism is None
    assert isinstance(make_mechanism(person), NoiselessFedAvg) and make_mechanism(person).takes_local_steps
    for section, field in (("federation", "rounds"), ("federation", "clients_per_round"),
                           ("federation", "local_epochs"), ("model", "hidden_size"), ("model", "readout"),
                           ("model", "shortcut"), ("model", "recurrent"), ("privacy", "max_update_norm"),
                           ("privacy", "participation")):
        assert getattr(getattr(person, section), field) == getattr(getattr(person_private, section), field), field
    # FedPer's personal heads have no step in DP-FedAvg: refused at person level on this line, as with DP
    with pytest.raises(ConfigError, match="'fedper' is not built on the distributed line"):
        small_config("privacy.unit=person", "federation.strategy=fedper")
    local_fedper = small_config("privacy.unit=person", "federation.strategy=fedper", "privacy.mechanism=local")
    assert local_fedper.algorithm is None
    # On the local line: local epochs (FedAvg), as before.
    for overrides in (["privacy.mechanism=local"], ["aggregation.backend=ckks"], ["aggregation.backend=plain"],
                      ["privacy.unit=person", "privacy.mechanism=local"]):
        config = small_config(*overrides)
        assert config.algorithm is None and type(make_mechanism(config)) is NoDP, overrides
    assert small_config("privacy.epsilon=3", "privacy.mechanism=local").algorithm == "local"
    for epsilon in ("inf", "3"):  # nn.LSTM gives no per-record clipped sums: refused before anything runs
        with pytest.raises(ConfigError, match="model.recurrent 'lstm' cannot train with distributed DP-SGD"):
            small_config("model.recurrent=lstm", f"privacy.epsilon={epsilon}")
    assert small_config("model.recurrent=lstm", "privacy.mechanism=local").model.recurrent == "lstm"


def test_a_strategy_that_needs_local_steps_is_refused_there_as_under_distributed_dp(small_clips):
    for epsilon in ("inf", "3"):
        with pytest.raises(ConfigError, match="fedprox' changes how clients train locally.*privacy.mechanism 'local'"):
            prepare_federation(small_config("federation.strategy=fedprox", f"privacy.epsilon={epsilon}"), small_clips)
    assert type(prepare_federation(small_config("federation.strategy=fedprox", "privacy.mechanism=local"),
                                   small_clips).mechanism) is NoDP


def test_a_noiseless_plan_adds_no_noise_and_cannot_be_accounted():
    config = small_config()
    plan = noiseless_plan(config, delta=1e-5, dimension=500, steps=3, clients=4, records=400)
    assert plan.noise == NOISELESS and plan.mu == plan.share_variance == 0 and plan.colluders == 0
    values = np.random.default_rng(0).normal(size=500)
    encoded = encode_contribution(values, plan, noise_generator(bytes(32)))
    assert np.all(np.abs(encoded - values * plan.scale) < 1)  # randomized rounding only
    with pytest.raises(ValueError):
        plan.family  # no noise family: nothing can charge this plan as private
    with pytest.raises(ValueError, match="calibrate its noise"):
        noiseless_plan(small_config("privacy.epsilon=3"), delta=1e-5, dimension=5, steps=1, clients=4, records=4)


def test_the_released_step_is_the_exact_mean_of_the_clipped_gradients(small_clips, monkeypatch):
    config = small_config(*FAST, "federation.rounds=1")
    federation = prepare_federation(config, small_clips)
    seen = []
    original = mechanisms.distributed.run_distributed_round

    def spy(**kwargs):
        model = kwargs["model_for"](kwargs["cohort"][0])  # the global model the round starts from (FedAvg)
        seen.append((model, kwargs["shared"], kwargs["objective"], original(**kwargs)))
        return seen[-1][-1]

    monkeypatch.setattr(mechanisms.distributed, "run_distributed_round", spy)
    simulate(config, None, clips=small_clips)
    model, shared, objective, result = seen[0]
    plan = federation.plans[TRAINING]
    clients = federation.clients[TRAINING]
    assert sorted(result.included) == sorted(clients)  # sample rate 1, every client: the whole training set
    features = torch.cat([clients[c].features for c in sorted(clients)])
    targets = torch.cat([clients[c].targets for c in sorted(clients)])
    sums = clipped_gradient_sums(model, features, targets, torch.zeros(len(features), dtype=torch.long), 1,
                                 plan.max_grad_norm, objective=objective).sums
    exact = torch.cat([sums[name][0].reshape(-1) for name in shared]).double().numpy() / len(features)
    # each client's randomized rounding moves a coordinate by less than one integer unit
    assert np.max(np.abs(result.gradient - exact)) < len(clients) / plan.scale / len(features)
    assert np.max(np.abs(exact)) > 100 * len(clients) / plan.scale / len(features)  # and the step is not ~0


@pytest.mark.parametrize("participation", [1.0, 0.5])
def test_at_person_level_the_released_step_is_the_exact_mean_of_the_clipped_updates(small_clips, monkeypatch,
                                                                                     participation):
    """DP-FedAvg without noise: each client's clipped whole update (zeros on tails), randomly rounded, summed
    securely, over the public denominator p x included — and no noise share in any contribution."""
    from privfer.fl.mechanisms import distributed_person
    from privfer.privacy.person import clip_update

    config = small_config(*FAST, "federation.rounds=1", "privacy.unit=person",
                          f"privacy.participation={participation}")
    made, released = [], []
    real_contribution, real_release = distributed_person.person_contribution, NoiselessFedAvg.release

    def contribution(update, heads, plan, rng):
        made.append((np.asarray(update, dtype=np.float64), heads, plan, real_contribution(update, heads, plan, rng)))
        return made[-1][-1]

    def release(self, *args, **kwargs):
        released.append(real_release(self, *args, **kwargs))
        return released[-1]

    monkeypatch.setattr(distributed_person, "person_contribution", contribution)
    monkeypatch.setattr(NoiselessFedAvg, "release", release)
    simulate(config, None, clips=small_clips)
    plan = made[0][2]
    assert plan.noise == NOISELESS and plan.sample_rate == participation
    clipped = [clip_update(update, plan.max_grad_norm) * heads for update, heads, _, _ in made]
    assert max(np.linalg.norm(c) for c in clipped) == pytest.approx(plan.max_grad_norm)  # the clip binds
    for exact, (_, _, _, encoded) in zip(clipped, made):
        assert np.all(np.abs(encoded - exact * plan.scale) < 1)  # randomized rounding, no noise share
    assert (participation == 1.0) == all(heads for _, heads, _, _ in made)
    step = -np.sum(clipped, axis=0) / (participation * len(made))
    assert np.max(np.abs(released[0].gradient - step)) < len(made) / plan.scale / (participation * len(made))
    assert np.max(np.abs(step)) > 100 / plan.scale  # and the step is not ~0


@pytest.mark.parametrize("unit", ["record", "person"])
def test_the_ledger_says_the_run_is_not_private_and_the_audit_agrees(small_clips, tmp_path, unit):
    from privfer.auditing import audit_path

    result = simulate(small_config(*FAST, f"privacy.unit={unit}"), tmp_path / "run", clips=small_clips)
    ledger = json.loads((tmp_path / "run" / "privacy_ledger.json").read_text())
    assert ledger["private"] is False and result.privacy.epsilon_max is None and result.privacy.mechanism is None
    assert {c["rounds_trained"] for c in ledger["clients"]} == {3}
    algorithm = {"record": "distributed DP-SGD's steps", "person": "distributed DP-FedAvg's rounds"}[unit]
    assert ledger["mechanism"].startswith(f"none: trained without DP ({algorithm} with no noise share")
    assert ledger["neighbouring_relation"] == NO_DP_RELATION and ledger["unit"] == unit
    assert all(c["epsilon"] is None and c["noise_multiplier"] is None for c in ledger["clients"])
    report = audit_path(tmp_path / "run")
    assert not report.passed and report.verdict_counts()[NO_DP] == len(ledger["clients"])
    assert report.run_checks == []  # the ledger agrees with the run (its unit's clipping bound among the rest)
    assert ledger["max_grad_norm"] == (0.5 if unit == "person" else 1.0)


def test_a_run_without_dp_keeps_its_best_validation_round_and_resumes_to_it(small_clips, tmp_path):
    class Killed(Exception):
        pass

    def kill_after_three(record):
        if record.round == 3:
            raise Killed

    overrides = ["federation.rounds=5", "privacy.noise_source=run_seed", "federation.adaptation=false"]
    whole = simulate(small_config(*overrides), tmp_path / "whole", clips=small_clips)
    rounds = json.loads((tmp_path / "whole" / "rounds.json").read_text())
    scores = [r["val_macro_f1"] for r in rounds]
    assert whole.selected_round == 1 + scores.index(max(scores))  # the first of the best
    with pytest.raises(Killed):
        simulate(small_config(*overrides), tmp_path / "killed", clips=small_clips, on_round=kill_after_three)
    resumed = simulate(small_config(*overrides), tmp_path / "killed", clips=small_clips)
    assert resumed.selected_round == whole.selected_round and resumed.test == whole.test
    private = simulate(small_config(*FAST, "privacy.epsilon=3"), None, clips=small_clips)
    assert private.selected_round is None  # a private run keeps its last round: no choice from unprotected people
    with pytest.raises(ConfigError, match="federation.keep_best_round true with privacy.epsilon"):
        small_config("privacy.epsilon=3", "federation.keep_best_round=true")
    last = simulate(small_config(*overrides, "federation.keep_best_round=false"), None, clips=small_clips)
    assert last.selected_round is None


def test_aborted_rounds_and_old_checkpoints_are_never_chosen_and_a_private_checkpoint_cannot_carry_a_choice(
        small_clips, tmp_path):
    from privfer.errors import RunDirectoryError
    from privfer.fl.federation import RunState
    from privfer.runs import load_checkpoint, save_checkpoint

    # every round aborts (dropouts below the minimum inputs): no round changed the model, none is "the best"
    aborted = simulate(small_config(*FAST, "federation.dropout=0.5", "aggregation.min_inputs_fraction=1.0"), None,
                       clips=small_clips)
    assert aborted.rounds.aborted == aborted.rounds.training and aborted.selected_round is None
    # a checkpoint from before runs without DP kept their best round: its rounds cannot be chosen from
    legacy = {"global": {}, "personal": {}, "accounts": [], "records": [], "newcomer_head": None,
              "after_training": None, "elapsed": 0.0, "nonce": "n", "noise_key": "k"}
    assert RunState.from_checkpoint(legacy).selecting
    legacy["records"] = [dict(phase="training", round=1, clients=[], included=[], dropouts={}, aborted=None,
                              train_loss=None, val_macro_f1=0.1, seconds=0.0, aggregation_seconds=0.0,
                              bytes_per_client=0.0, clipped=0)]
    assert not RunState.from_checkpoint(legacy).selecting
    # a private run's checkpoint edited to carry a model chosen on the validation actors is refused
    config = small_config(*FAST, "privacy.epsilon=3", "privacy.noise_source=run_seed")

    class Killed(Exception):
        pass

    def kill(record):
        raise Killed

    with pytest.raises(Killed):
        simulate(config, tmp_path / "private", clips=small_clips, on_round=kill)
    checkpoint = tmp_path / "private" / "checkpoint.pt"
    saved = load_checkpoint(checkpoint, True)
    saved["best"] = {"round": 1, "val_macro_f1": 1.0, "global": saved["global"]}
    save_checkpoint(checkpoint, saved)  # the integrity hash is unkeyed: whoever edits it can rewrite it
    with pytest.raises(RunDirectoryError, match="edited"):
        simulate(config, tmp_path / "private", clips=small_clips)


def test_a_run_directory_whose_settings_privfer_now_resolves_differently_says_it_cannot_resume(small_clips, tmp_path):
    import yaml

    from privfer.errors import RunDirectoryError

    config = small_config(*FAST, "federation.rounds=1")
    simulate(config, tmp_path / "run", clips=small_clips)
    saved = tmp_path / "run" / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    old["model"]["recurrent"] = "auto"  # as a run without DP written before issue 26 left it
    saved.write_text(yaml.safe_dump(old, sort_keys=False))
    (tmp_path / "run" / "result.json").unlink()
    with pytest.raises(RunDirectoryError, match="resolves model.recurrent differently, so it cannot resume it"):
        simulate(config, tmp_path / "run", clips=small_clips)


def test_a_run_directory_or_study_cell_that_trained_otherwise_is_not_taken_for_this_run(small_clips, tmp_path):
    """A person-level run without DP written before it trained as DP-FedAvg without noise (FedAvg of local epochs,
    20 clients a round) has the same config.yaml when its settings were explicit: its run.json says how it trained,
    and a run.json without that is such an old run. Resuming it, reusing it as a study cell, and auditing it as the
    new algorithm are refused."""
    from privfer.auditing import audit_path
    from privfer.errors import RunDirectoryError
    from privfer.runs import training_mismatch
    from privfer.study.runner import finished_result
    from privfer.study.spec import Cell

    config = small_config(*FAST, "federation.rounds=1", "privacy.unit=person")
    run = tmp_path / "run"
    simulate(config, run, clips=small_clips)
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["trained_by"] == config.trained_by and training_mismatch(run, config) is None
    (run / "run.json").write_text(json.dumps({"command": "simulate"}))  # as written before it was recorded
    assert "FedAvg of local epochs" in training_mismatch(run, config)
    with pytest.raises(RunDirectoryError, match="was trained .*by FedAvg of local epochs.* cannot resume it"):
        simulate(config, run, clips=small_clips)
    # a study cell whose folder holds it is not reported as finished
    cells = tmp_path / "study" / "cells"
    cells.mkdir(parents=True)
    (run).rename(cells / "c")
    cell = Cell("c", {}, 0, config)
    assert finished_result(cell, tmp_path / "study") is None
    (cells / "c" / "run.json").write_text(json.dumps({"command": "simulate", "trained_by": config.trained_by}))
    assert finished_result(cell, tmp_path / "study") == cells / "c" / "result.json"
    # another recorded algorithm is refused by name; a private run's directory from before is not affected
    (cells / "c" / "run.json").write_text(json.dumps({"command": "simulate", "trained_by": "local"}))
    assert "was trained by 'local'" in training_mismatch(cells / "c", config)
    assert finished_result(cell, tmp_path / "study") is None
    (cells / "c" / "run.json").write_text(json.dumps({"command": "simulate"}))
    assert training_mismatch(cells / "c", small_config(*FAST, "privacy.epsilon=8")) is None
    # the audit holds a ledger without DP to how the run's config trains now
    ledger = json.loads((cells / "c" / "privacy_ledger.json").read_text())
    assert audit_path(cells / "c").run_checks == []
    ledger["mechanism"] = ledger["mechanism"].replace("distributed DP-FedAvg's rounds with no noise share: clipped "
                                                      "whole updates through the secure sum",
                                                      "FedAvg of the clients' local epochs, no clipping")
    (cells / "c" / "privacy_ledger.json").write_text(json.dumps(ledger))
    assert any("how the run trained" in problem for problem in audit_path(cells / "c").run_checks)
