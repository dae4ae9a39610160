"""A real Flower deployment on 127.0.0.1: a SuperLink, three SuperNodes and `flwr run` of the example app.

Two rounds of DP-SGD training with privfer's secure aggregation across separate processes (each stage a fresh
ClientApp process restoring the node's protocol state from its Context); the result is checked and every process
is shut down. Marked ``deployment`` (runs in CI; ``-m "not deployment"`` skips it locally): about two minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason='the Flower integration needs pip install -e ".[flower]"')

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "flower"
BIN = Path(sys.executable).parent
SMALL = ("data.frames=4 data.feature_dim=32 data.synthetic.actors=48 data.synthetic.missing_clips=0 "
         "data.split.val_actors=4 data.split.test_actors=8 model.hidden_size=16 federation.local_epochs=1 "
         "training.batch_size=32 privacy.accountant=rdp")  # RDP: calibrates in half PRV's time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {seconds} s")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.deployment
@pytest.mark.skipif(sys.platform == "win32", reason="process groups")
def test_two_rounds_on_a_superlink_and_three_supernodes(tmp_path):
    app = tmp_path / "app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("__pycache__"))  # flwr run may migrate files
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process below
        process = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=tmp_path, start_new_session=True)
        process.log = log  # type: ignore[attr-defined]
        processes.append(process)
        return process

    result_file = tmp_path / "result.json"
    try:
        superlink = start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                          "--host", "127.0.0.1", "--port", str(port))
        wait_for_port(port, superlink, 60)
        for index in range(3):
            start(f"supernode{index}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                  "--port", str(free_port()), "--node-config", f"partition-id={index} num-partitions=3")
        run_config = (f'num-server-rounds=2 epsilon="3" min-nodes=3 timeout=120.0 '
                      f'privfer-set="{SMALL}" result-file="{result_file}"')
        completed = subprocess.run([str(BIN / "flwr"), "run", str(app), "local", "--run-config", run_config],
                                   env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stdout + completed.stderr
        deadline = time.monotonic() + 420
        while not result_file.exists() and time.monotonic() < deadline:
            time.sleep(1)
        if not result_file.exists():
            tails = {p.name: p.read_text(errors="replace")[-1500:] for p in logs.iterdir()}
            pytest.fail(f"no result after 7 minutes; logs: {tails}")
        result = json.loads(result_file.read_text())
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            process.log.close()  # type: ignore[attr-defined]
        deadline = time.monotonic() + 20  # children (flwr-serverapp, flwr-clientapp) share their group
        while any(group_alive(p.pid) for p in processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        for process in processes:
            if group_alive(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
    assert not any(group_alive(p.pid) for p in processes), "a Flower process outlived the test"

    assert result["rounds"] == 2 and result["epsilon_target"] == 3.0 and 0 < result["delta"] < 1
    reports = result["secure_aggregation"]
    assert [r["message_type"] for r in reports] == ["train", "train"]
    for report in reports:
        assert report["aborted"] is None and report["dropped"] == {}
        assert len(report["included"]) == 3 and report["example_count"] > 0
        assert set(report["seconds"]) == {"advertise_keys", "share_keys", "masked_input", "unmask"}
    scores = result["server_evaluation"]
    assert sorted(scores) == ["0", "1", "2"]
    assert all(0.0 <= s["macro-f1"] <= 1.0 for s in scores.values())
    assert scores["1"] != scores["0"]  # the aggregated update reached the global model
