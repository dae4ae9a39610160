"""The command line as a user meets it: tables, run directories, one-line errors with exit code 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privfer.cli import app

from conftest import SMALL

runner = CliRunner()
# --set wins over --epochs (documented order), so leave the epochs to each test.
SETS = [arg for item in SMALL if not item.startswith("training.epochs") for arg in ("--set", item)]


def run(*args):
    return runner.invoke(app, list(args))


def test_train_prints_the_paper_table_and_writes_the_run(tmp_path):
    out = tmp_path / "run"
    result = run("train", "--labels", "discrete", "--epochs", "2", *SETS, "--out", str(out))
    assert result.exit_code == 0, result.output
    for word in ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "micro avg", "macro avg", "precision"):
        assert word in result.output
    saved = json.loads((out / "result.json").read_text())
    assert saved["labels"] == "discrete" and len(saved["history"]) == 2


def test_train_json_output(tmp_path):
    result = run("train", "--epochs", "1", *SETS, "--out", str(tmp_path / "r"), "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["labels"] == "partial"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--set", "training.lr=-1"], "training.lr = -1: Input should be greater than 0 (allowed: > 0"),
        (["train", "--set", "training.nope=1"], "training.nope: unknown setting"),
        (["train", "--labels", "fuzzy"], "training.labels = 'fuzzy'"),
        (["train", "--config", "/no/such.yaml"], "config file /no/such.yaml does not exist"),
        (["train", "--data", "/no/such/dir"], "CREMA-D folder /no/such/dir does not exist"),
        (["train", "--set", "epochs"], "must look like section.field=value"),
        (["data", "summary", "--set", "data.frames=0"], "data.frames = 0"),
        (["config", "show", "--config", "/tmp/x[/]y.yaml"], "config file /tmp/x[/]y.yaml does not exist"),
        (["data", "summary", "--data", "/tmp/[red]CREMA"], "CREMA-D folder /tmp/[red]CREMA does not exist"),
        (["train", "--set", "training.epochs=true"], "expected a number, got the boolean"),
        (["train", "--set", "data.split.val_actors=80"], "leaves no training actor"),
        (["train", "--set", "model.ifer_weights=/no/ifer.pt"], "IFER weights file /no/ifer.pt does not exist"),
        (["train", "--out", "afile"], "run directory afile cannot be used"),
        (["data", "export", "afile/sub"], "cannot create afile/sub"),
        (["simulate", "--epsilon", "-1"], "privacy.epsilon = -1"),
        (["simulate", "--aggregator", "secret"], "aggregation.backend = 'secret'"),
        (["simulate", "--clients-per-round", "999"], "federation.clients_per_round = 999 is more than the"),
        (["simulate", "--epsilon", "0.01", "--set", "privacy.max_noise_multiplier=2"], "privacy budget unreachable"),
        (["simulate", "--dropout", "1"], "federation.dropout = 1"),
        (["simulate", "--epsilon", "nan"], "must be in (0, 1000] (or inf for no DP)"),
        (["simulate", "--epsilon", "1e8"], "must be in (0, 1000] (or inf for no DP)"),
        (["train", "--data", "afile"], "afile is a file; --data (data.path) is a CREMA-D folder"),
        (["canary-audit", "--epsilon", "2", "--sweep", " "], "--sweep takes epsilons separated by commas"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    if args[0] in ("train", "simulate"):
        args = [args[0], *SETS, *args[1:]]  # the case's own --set comes last and wins
    result = run(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing left behind


def test_rerun_into_another_runs_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    assert run("train", "--epochs", "1", *SETS, "--out", str(out)).exit_code == 0
    result = run("train", "--epochs", "2", *SETS, "--out", str(out))
    assert result.exit_code == 2 and "holds a run with a different config" in result.stderr
    # it names what differs and how to resume the run that is there
    message = " ".join(result.stderr.split())
    assert "training.epochs: 1 there, 2 now" in message and "--set training.epochs=1" in message


def test_export_then_train_on_the_exported_folder(tmp_path):
    folder = tmp_path / "cremad"
    result = run("data", "export", str(folder), *SETS)
    assert result.exit_code == 0 and (folder / "processedResults" / "tabulatedVotes.csv").exists()
    assert run("data", "export", str(folder)).exit_code == 2  # never overwrites
    summary = run("data", "summary", "--data", str(folder))
    assert summary.exit_code == 0 and "cremad" in summary.output and "3936" in summary.output
    trained = run("train", "--epochs", "1", "--data", str(folder), *SETS, "--out", str(tmp_path / "r"))
    assert trained.exit_code == 0, trained.output


def test_default_run_directories_are_distinct(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert run("train", "--epochs", "1", *SETS, "--set", "output.save_model=false").exit_code == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((r / "result.json").exists() for r in runs)


def test_config_show_reflects_overrides():
    result = run("config", "show", "--set", "training.lr=0.5", "--set", "seed=9")
    assert result.exit_code == 0
    assert "lr: 0.5" in result.output and "seed: 9" in result.output


def privfer_script():
    script = shutil.which("privfer") or str(Path(sys.executable).with_name("privfer"))
    assert Path(script).exists(), "the privfer console script is not installed"
    return script


def test_console_script_is_installed():
    completed = subprocess.run([privfer_script(), "--version"], capture_output=True, text=True)
    assert completed.returncode == 0 and completed.stdout.startswith("privfer ")


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--epochs", "abc"], "Invalid value for '--epochs'"),
        (["trian"], "No such command 'trian'"),
        (["data", "export"], "Missing argument"),
        (["train", "--no-such-option"], "No such option"),
    ],
)
def test_usage_errors_of_the_console_script_are_one_line(args, message):
    completed = subprocess.run([privfer_script(), *args], capture_output=True, text=True)
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], completed.stderr


def test_simulate_prints_what_the_budget_bought_and_writes_the_run(tmp_path):
    out = tmp_path / "sim"
    # (rounds of 6 of the 36 clients: the shares are sized for the population's 3 colluders, which a round of 3 could
    # be made of entirely; privfer refuses such a round, below)
    args = ["simulate", "--epsilon", "4", "--rounds", "2", "--clients-per-round", "6", "--strategy", "fedper",
            "--dropout", "0.2", "--seed", "3", *SETS, "--set", "privacy.accountant=rdp", "--out", str(out)]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "epsilon 4 per client for the whole run (record level), delta" in result.stderr
    for words in ("macro avg", "epsilon spent: max / median", "rounds (training + adaptation)", "2 + 1"):
        assert words in result.stdout
    saved = json.loads((out / "result.json").read_text())
    assert saved["strategy"] == "fedper" and saved["private"] and saved["aggregator"] == "masking"
    assert saved["privacy"]["epsilon_max"] <= 4.0
    refused = run("simulate", "--epsilon", "4", "--rounds", "2", "--clients-per-round", "3", *SETS,
                  "--out", str(tmp_path / "three"))
    assert refused.exit_code == 2 and "no honest client" in refused.stderr and "Traceback" not in refused.output
    for name in ("config.yaml", "privacy_ledger.json", "rounds.json"):
        assert (out / name).is_file()
    again = run(*args, "--json")  # a finished run directory answers with its result
    assert again.exit_code == 0 and json.loads(again.stdout)["test"] == saved["test"]


def test_simulate_says_loudly_when_nothing_is_private(tmp_path):
    result = run("simulate", "--rounds", "1", "--clients-per-round", "2", "--aggregator", "plain", *SETS,
                 "--set", "federation.adaptation=false", "--out", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    assert "privacy: OFF" in result.stderr and "NOT PRIVATE" in result.stderr


def test_a_resumed_simulation_says_so(tmp_path, monkeypatch):
    from privfer.fl import simulation

    out = tmp_path / "resumed"
    args = ["simulate", "--rounds", "2", "--clients-per-round", "2", "--aggregator", "plain", *SETS,
            "--set", "federation.adaptation=false", "--out", str(out)]
    real = simulation._run_round
    calls = []

    def dies_in_round_two(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(simulation, "_run_round", dies_in_round_two)
    assert run(*args).exit_code != 0
    monkeypatch.setattr(simulation, "_run_round", real)
    resumed = run(*args)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming: 1 of 2 rounds are done" in resumed.stderr


def test_more_canaries_than_coordinates_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("canary-audit", *SETS, "--epsilon", "2", "--canaries", "10000000", "--guesses", "10")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: 10000000 canaries but the model has")


def test_simulate_runs_no_other_python_thread_during_its_rounds_so_their_clients_may_fork(tmp_path, monkeypatch):
    """privfer.secagg.hosts forks a round's clients only from a process without other Python threads: the
    progress bar must not keep a refresh thread alive while rounds run."""
    import threading

    from privfer.fl import aggregation
    from privfer.secagg import hosts

    seen = []
    real = hosts.forkable
    monkeypatch.setattr(aggregation, "client_processes", lambda clients: 2)  # as on a 2-core machine
    monkeypatch.setattr(hosts, "forkable", lambda clients: seen.append(threading.active_count()) or real(clients))
    result = run("simulate", *SETS, "--epsilon", "3", "--rounds", "2", "--set", "federation.adaptation=false",
                 "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {1}, seen


def test_a_run_directory_error_is_exactly_one_line_on_stderr(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x").write_text("not a run")
    result = run("simulate", *SETS, "--out", str(junk))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: {junk} exists and is not a privfer run directory; choose another "
                                          "--out"], result.stderr
