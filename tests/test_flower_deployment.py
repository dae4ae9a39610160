"""A real Flower deployment on 127.0.0.1: a SuperLink, three SuperNodes and `flwr run` of the example app.

Two rounds of person-level distributed DP (the example's default: each node adds its own noise share in
secagg_mod and charges the ledger file on its own disk) with privfer's secure aggregation across separate
processes (each stage a fresh ClientApp process restoring the node's protocol state from its Context). Then one
SuperNode is killed and restarted on the same ledger, and a second run finds every node's lifetime budget spent:
it is refused before any training. Every process is shut down. Marked ``deployment`` (runs in CI;
``-m "not deployment"`` skips it locally): about three minutes.
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

from privfer.secagg.identity import EnrollmentAuthority, Identity  # noqa: E402

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
def test_two_rounds_on_a_superlink_and_three_supernodes_then_a_restarted_node_keeps_its_budget(tmp_path):
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

    result_file, second_file = tmp_path / "result.json", tmp_path / "second.json"
    ledgers = tmp_path / "ledgers"  # each node's own disk
    ledgers.mkdir()

    # active security: an enrollment authority (not the server) signs the roster of the nodes' keys; each node
    # keeps its key on its own disk and pins the authority's public key
    keys = tmp_path / "keys"
    keys.mkdir()
    authority = EnrollmentAuthority()
    authority.identity.save(keys / "authority.key")
    members = {}
    for index in range(3):
        identity = Identity.generate()
        identity.save(keys / f"node-{index}.key")
        members[101 + index] = identity.public
    (keys / "roster.cert").write_bytes(authority.certify("deployment-study", members).to_bytes())

    def supernode(index: int) -> subprocess.Popen:
        return start(f"supernode{index}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                     "--port", str(free_port()), "--node-config",
                     f'partition-id={index} num-partitions=3 ledger="{ledgers / f"node-{index}.json"}" '
                     f'lifetime-epsilon=3.0 identity-key="{keys / f"node-{index}.key"}" '
                     f'roster-certificate="{keys / "roster.cert"}" authority-key="{keys / "authority.key.pub"}"')

    def flwr_run(rounds: int, path: Path) -> dict:
        run_config = (f'num-server-rounds={rounds} epsilon="3" min-nodes=3 timeout=120.0 '
                      f'privfer-set="{SMALL}" result-file="{path}" roster-certificate="{keys / "roster.cert"}" '
                      f'authority-key="{keys / "authority.key.pub"}"')
        completed = subprocess.run([str(BIN / "flwr"), "run", str(app), "local", "--run-config", run_config],
                                   env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stdout + completed.stderr
        deadline = time.monotonic() + 420
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(1)
        if not path.exists():
            tails = {p.name: p.read_text(errors="replace")[-1500:] for p in logs.iterdir()}
            pytest.fail(f"no result after 7 minutes; logs: {tails}")
        return json.loads(path.read_text())

    try:
        superlink = start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                          "--host", "127.0.0.1", "--port", str(port))
        wait_for_port(port, superlink, 60)
        nodes = [supernode(index) for index in range(3)]
        result = flwr_run(2, result_file)
        spent = json.loads((ledgers / "node-0.json").read_text())
        os.killpg(nodes[0].pid, signal.SIGTERM)  # node 0 goes down and comes back on the same disk
        nodes[0].wait(timeout=30)
        supernode(0)
        second = flwr_run(1, second_file)
        after = json.loads((ledgers / "node-0.json").read_text())
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
    assert result["mechanism"] == "distributed" and result["unit"] == "person"
    reports = result["secure_aggregation"]
    assert [r["message_type"] for r in reports] == ["train", "train"]
    for report in reports:
        assert report["aborted"] is None and report["dropped"] == {}
        assert len(report["included"]) == 3 and report["example_count"] == 0  # no count leaves a node
        assert set(report["seconds"]) == {"advertise_keys", "share_keys", "masked_input", "consistency", "unmask"}
        assert report["security"] == "active" and sorted(report["client_ids"].values()) == [101, 102, 103]
    # the restarted node kept its ledger: the second run is refused past the lifetime budget, before training
    assert spent["rounds"] == 2 and 0.9 * 3.0 <= spent["epsilon"] <= 3.0 + 1e-9 and after == spent
    (refused,) = second["secure_aggregation"]
    assert refused["included"] == []
    # the three live nodes (the restarted one among them) refuse; the SuperLink may still list the dead one
    assert sum("lifetime" in reason for reason in refused["dropped"].values()) == 3
    assert all(r.startswith("advertise_keys:") for r in refused["dropped"].values() if "lifetime" in r)
    scores = result["server_evaluation"]
    assert sorted(scores) == ["0", "1", "2"]
    assert all(0.0 <= s["macro-f1"] <= 1.0 for s in scores.values())
    assert scores["1"] != scores["0"]  # the aggregated update reached the global model
