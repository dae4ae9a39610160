"""A round whose clients run in forked processes (privfer.secagg.hosts) is the same round: the same messages, the
same sum and included set, the same failures; no child outlives it."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privfer.secagg import SecAggConfig, aggregate
from privfer.secagg.client import SecAggClient
from privfer.secagg.errors import InvalidRoundArguments, InvalidUpdate, WrongRound
from privfer.secagg.hosts import ClientProcessDied, default_processes, fork_available, forkable, split_blocks
from privfer.secagg.identity import Enrollment, enroll_in_process
from privfer.secagg.randomness import InsecureDeterministicRandomness

pytestmark = pytest.mark.skipif(not fork_available(), reason="client processes need the fork start method")


def per_client(seed: int):
    """Each client its own deterministic stream (test vectors only), so two runs of a round send the same bytes."""
    return lambda cid: InsecureDeterministicRandomness(hashlib.sha256(f"{seed}/{cid}".encode()).digest())


def transcript(result) -> list[tuple[str, str, int, bytes]]:
    return [(e.stage, e.direction, e.party, e.message.to_bytes()) for e in result.transcript.entries]


@st.composite
def rounds(draw):
    n = draw(st.integers(5, 14))
    security = draw(st.sampled_from(["active", "semi_honest"]))
    # at most one client dropped after its input, under active security (each such drop must sign: not modelled
    # at "consistency"), a few before it
    stages = ["advertise_keys", "share_keys", "masked_input"] + (["unmask"] if security == "semi_honest" else [])
    dropped = draw(st.lists(st.integers(1, n), max_size=max(0, n // 4), unique=True))
    dropouts = {c: draw(st.sampled_from(stages)) for c in dropped}
    processes = draw(st.integers(2, 4))
    return n, security, dropouts, processes, draw(st.integers(0, 2**16))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds())
def test_a_round_split_over_processes_sends_the_same_bytes_and_sums_the_same(case):
    n, security, dropouts, processes, seed = case
    rng = np.random.default_rng(seed)
    updates = {c: [rng.normal(size=(3, 7)).astype(np.float32)] for c in range(1, n + 1)}
    config = SecAggConfig(num_clients=n, security=security)
    enrolled = enroll_in_process(range(1, n + 1))
    runs = []
    for p in (1, processes):  # the same identities, each run its own record of the rounds joined
        enrollments = {m: Enrollment(m, e.identity, e.certificate) for m, e in enrolled.items()}
        runs.append(aggregate(updates, config, dropouts, round_id="split", randomness=per_client(seed),
                              enrollments=enrollments if security == "active" else None, processes=p))
    assert transcript(runs[0]) == transcript(runs[1])
    assert runs[0].included == runs[1].included
    np.testing.assert_array_equal(runs[0].total[0], runs[1].total[0])
    assert runs[0].times.masking.keys() == runs[1].times.masking.keys()
    expected = sum(updates[c][0].astype(np.float64) for c in runs[1].included)
    assert np.abs(runs[1].total[0] - expected).max() <= runs[1].error_bound
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("failing", [8, 1])  # the last block's client (a child runs it), the first (this process)
def test_a_failure_is_raised_as_itself_and_the_children_are_reaped(failing):
    updates = {c: [np.ones(4, np.float32)] for c in range(1, 9)}
    updates[failing] = [np.array([1.0, np.nan, 0.0, 0.0], np.float32)]
    config = SecAggConfig(num_clients=8, security="semi_honest")
    for processes in (1, 2):
        with pytest.raises(InvalidUpdate, match="finite"):
            aggregate(updates, config, processes=processes)
        assert multiprocessing.active_children() == []


def test_a_child_that_dies_ends_the_round_with_a_clear_error(monkeypatch):
    parent = os.getpid()
    real = SecAggClient.masked_input

    def dying(self, *args, **kwargs):
        if os.getpid() != parent:
            os._exit(3)  # killed mid-round (out of memory, say)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SecAggClient, "masked_input", dying)
    updates = {c: [np.ones(4, np.float32)] for c in range(1, 9)}
    with pytest.raises(ClientProcessDied, match="exit code 3"):
        aggregate(updates, SecAggConfig(num_clients=8, security="semi_honest"), processes=2)
    assert multiprocessing.active_children() == []


def test_the_blocks_cover_every_client_once_and_processes_are_checked():
    for count in range(1, 30):
        ids = list(range(3, 3 + count))
        for processes in range(1, 6):
            blocks = split_blocks(ids, processes)
            assert [c for block in blocks for c in block] == ids
            assert len(blocks) == min(processes, count) and all(blocks)
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert default_processes(10) == 1  # fewer than 16 clients per process: not worth a fork
    assert 1 <= default_processes(1000) <= 8
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InvalidRoundArguments, match="processes"):
            aggregate({1: [np.ones(2)], 2: [np.ones(2)]}, SecAggConfig(num_clients=2), processes=bad)


def test_a_member_run_in_a_child_cannot_join_the_same_round_id_again():
    enrollments = enroll_in_process(range(1, 9))
    updates = {c: [np.ones(4, np.float32)] for c in range(1, 9)}
    aggregate(updates, SecAggConfig(num_clients=8, security="active"), round_id="once", enrollments=enrollments,
              processes=2)
    with pytest.raises(WrongRound, match="member 5 already took part"):  # 5-8 ran in the child
        aggregate({c: updates[c] for c in range(5, 9)}, SecAggConfig(num_clients=4, security="active"), round_id="once",
                  enrollments=enrollments)


def test_a_randomness_stream_shared_by_clients_is_never_copied_into_a_child():
    """A fork would copy a stream two clients share: a client in the child would draw the bytes one here drew (the
    same self-mask seed undoes double masking). Such a round runs in one process: the same bytes as processes=1."""
    updates = {c: [np.full(4, float(c), np.float32)] for c in range(1, 9)}
    config = SecAggConfig(num_clients=8, security="semi_honest")
    runs = []
    for processes in (1, 2):
        shared = InsecureDeterministicRandomness(bytes(32))
        runs.append(aggregate(updates, config, round_id="r", randomness=lambda cid: shared, processes=processes))
    assert transcript(runs[0]) == transcript(runs[1])
    clients = {c: SecAggClient(c, config, "r", None, InsecureDeterministicRandomness(bytes(32))) for c in (1, 2)}
    assert forkable(clients)  # one stream each: fine
    clients[2].randomness = clients[1].randomness
    assert not forkable(clients)


def test_no_fork_while_another_python_thread_runs():
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        assert not forkable({})
    finally:
        release.set()
        worker.join()
    assert forkable({})


def test_a_refused_claim_records_no_member_that_never_advertised():
    enrollments = enroll_in_process(range(1, 9))
    enrollments[1].claim("r")  # member 1 (this process's block) already joined round r
    updates = {c: [np.ones(4, np.float32)] for c in range(1, 9)}
    with pytest.raises(WrongRound, match="member 1 already took part"):
        aggregate(updates, SecAggConfig(num_clients=8, security="active"), round_id="r", enrollments=enrollments,
                  processes=2)
    # as with one process, members 2-8 never advertised in r: they still may
    aggregate({c: updates[c] for c in range(5, 9)}, SecAggConfig(num_clients=4, security="active"), round_id="r",
              enrollments=enrollments)


ORPHAN = """
import time
from privfer.secagg.hosts import ClientHosts

class Stage:
    needs_model = False
    def respond(self, client, message, inputs):
        time.sleep(120)

hosts = ClientHosts({c: object() for c in range(1, 5)}, [Stage()], lambda cid: {}, processes=2)
print(hosts.children[0][0].pid, flush=True)
list(hosts.answer(0, None, None, {}, [1, 2, 3, 4]))
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_child_dies_with_its_parent():
    """A parent killed mid-round (SIGKILL, the OOM killer) leaves no child holding its clients' keys and updates."""
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        parent.kill()


def _report_forkable(queue) -> None:
    queue.put(forkable({}))


def test_a_daemonic_process_runs_its_rounds_alone():
    """multiprocessing forbids a daemonic process children: its rounds run in it, not split."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    daemon = context.Process(target=_report_forkable, args=(queue,), daemon=True)
    daemon.start()
    try:
        assert queue.get(timeout=60) is False
    finally:
        daemon.join(timeout=30)
    assert forkable({})
