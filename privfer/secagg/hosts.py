"""Where an in-process round's clients compute: here, or split over forked processes that run at the same time.

An in-process round (:func:`privfer.secagg.masking.aggregate`) simulates
every client of a round on one machine. The clients' work — key agreements,
share encryption and checks, mask expansion — is most of the round, and
OpenSSL's X25519 holds Python's GIL, so threads cannot spread it over cores.
With ``processes = P > 1`` the clients are split into P contiguous blocks by
id: this process runs the first block and P - 1 forked children run the
others, each child owning its clients for the whole round. Every stage's
messages still travel as bytes: the parent sends each child the stage's
broadcast or its clients' addressed messages, every process answers for its
clients in parallel, and the server receives all answers in client-id order,
exactly as with one process — so the transcript's structure, the sum and the
included set do not depend on P.

Each client's secrets exist only in the process that runs it; a child ends
with the round. A client's randomness (:class:`~privfer.secagg.randomness.Randomness`)
is used only in its own process: the OS CSPRNG is fork-safe, and a
deterministic per-client stream continues where it would in one process. A
stream *shared* by several clients would be copied into every child, and a
client there would draw the bytes a client here drew (the same self-mask
seed: double masking undone), so such a round runs in one process
(:func:`forkable`), as does a round started while other Python threads run
(a fork can copy a lock another thread holds). A thread started beneath the
``threading`` module (pytest-xdist's message reader is one) escapes that
check, so a child also avoids what such a thread could hold: it looks up
nothing in the dynamic loader and skips the interpreter's exit (``os._exit``),
touching only its pipe and its clients. A child dies with its parent
(Linux's parent-death signal) and ends when the parent's end of its pipe
closes. Forking needs the ``fork`` start method (Linux, and macOS where
Python allows it); elsewhere, or with P = 1, everything runs here.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import pickle
import signal
import threading
import time
import warnings
from multiprocessing.connection import wait
from typing import Any, Callable, Iterator, Mapping, Sequence

from privfer.secagg.errors import SecAggError
from privfer.secagg.randomness import Randomness

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>

Answer = tuple[int, "bytes | None", "BaseException | None", float, float]
"""(client id, its answer's bytes or None, the exception it raised or None, seconds, its mask seconds)."""


class ClientProcessDied(SecAggError):
    """A forked client process ended without answering (killed, or out of memory)."""


def fork_available() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def split_blocks(ids: Sequence[int], processes: int) -> list[list[int]]:
    """``ids`` (sorted) in ``processes`` contiguous blocks whose sizes differ by at most one (none empty)."""
    ids = sorted(ids)
    count = max(1, min(processes, len(ids)))
    size, extra = divmod(len(ids), count)
    blocks, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        blocks.append(ids[start:end])
        start = end
    return blocks


def answer_all(clients: Mapping[int, Any], stage: Any, broadcast: Any, addressed: Mapping[int, tuple[type, bytes]],
               cids: Sequence[int], inputs: Callable[[int], dict]) -> list[Answer]:
    """Each client of ``cids`` answers ``stage``: its addressed message (decoded by it) or the broadcast. A client
    that raises stops this block's answers: the round ends at the first failure in id order anyway."""
    answers: list[Answer] = []
    for cid in cids:
        started = time.perf_counter()
        try:
            if cid in addressed:
                kind, raw = addressed[cid]
                message = kind.from_bytes(raw)
            else:
                message = broadcast
            answer = stage.respond(clients[cid], message, inputs(cid) if stage.needs_model else {}).to_bytes()
        except Exception as exc:  # returned, raised by the parent in id order
            answers.append((cid, None, exc, time.perf_counter() - started, 0.0))
            break
        answers.append((cid, answer, None, time.perf_counter() - started, clients[cid].mask_seconds))
    return answers


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling as its own type, else a SecAggError naming it."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc):
            return exc
    except Exception:
        pass
    return SecAggError(f"{type(exc).__name__}: {exc}")


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once, in the parent before it forks: a child calls it without a ``dlopen``, whose
    loader lock another thread of the parent may have held at the fork."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this child when the parent (pid ``parent``) dies (SIGKILL, the OOM killer), so no
    child keeps its clients' keys and the round's updates in memory beyond the round (or runs a study's cell into
    a folder the study's next run resumes)."""
    prctl = _prctl()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _serve(connection, inherited: Sequence[Any], parent: int, clients: Mapping[int, Any], stages: Sequence[Any],
           inputs: Callable[[int], dict]) -> None:
    """A child's loop: answer each stage the parent sends for this child's clients, until told to stop or until
    the parent's end of the pipe closes. The child then ends with ``os._exit``, skipping the interpreter's exit
    (atexit handlers, flushing the standard streams): whatever a thread of the parent held at the fork, the child
    touches only its pipe and its clients."""
    code = 0
    try:
        die_with_parent(parent)
        for end in inherited:  # the parent's ends of this and earlier children's pipes: held here, no EOF could come
            end.close()
        while True:
            command = connection.recv()
            if command is None:
                break
            index, broadcast, addressed, cids = command
            message = None if broadcast is None else broadcast[0].from_bytes(broadcast[1])
            answers = answer_all(clients, stages[index], message, addressed, cids, inputs)
            connection.send([(cid, raw, None if error is None else _portable(error), seconds, mask)
                             for cid, raw, error, seconds, mask in answers])
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    except BaseException:  # the parent sees the pipe close and raises ClientProcessDied with this exit code
        code = 1
    finally:
        connection.close()
        os._exit(code)


class ClientHosts:
    """The round's clients, in this process and in ``processes - 1`` forked children (see the module's doc).

    Use as a context manager: leaving it stops and reaps every child, whatever happened in the round."""

    def __init__(self, clients: Mapping[int, Any], stages: Sequence[Any], inputs: Callable[[int], dict],
                 processes: int = 1) -> None:
        self.clients, self.stages, self.inputs = clients, stages, inputs
        if processes > 1 and not forkable(clients):
            processes = 1
        blocks = split_blocks(list(clients), processes)
        self.local = set(blocks[0])
        self.children: list[tuple[Any, Any, set[int]]] = []  # (process, connection, its clients)
        self._busy: set[int] = set()  # pids of children sent a stage whose answers are not read yet
        if len(blocks) > 1:
            _prctl()  # looked up here, not in a child
            context = multiprocessing.get_context("fork")
            try:
                with warnings.catch_warnings():
                    # Python 3.12+ warns that forking a multi-threaded process may deadlock the child if another
                    # thread held a lock (an import lock, say) at the fork. Only torch's native worker threads run
                    # here: forkable() refuses a process with other Python threads.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    for block in blocks[1:]:
                        parent_end, child_end = context.Pipe()
                        mine = {cid: clients[cid] for cid in block}
                        inherited = [connection for _, connection, _ in self.children] + [parent_end]
                        process = context.Process(target=_serve, daemon=True, args=(
                            child_end, inherited, os.getpid(), mine, stages, inputs))
                        process.start()
                        child_end.close()
                        self.children.append((process, parent_end, set(block)))
            except BaseException:
                self.close()  # the children already started
                raise

    def runs_here(self, cid: int) -> bool:
        """Whether client ``cid`` runs in this process (its state here is current), not in a child."""
        return cid in self.local

    def __enter__(self) -> "ClientHosts":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every child: told to, or killed if it still works on a stage whose answers nobody will read (the
        round ended early) or does not stop within 5 s."""
        for process, connection, _ in self.children:
            if process.pid in self._busy:
                process.kill()
            else:
                try:
                    connection.send(None)
                except (OSError, BrokenPipeError):
                    pass
            connection.close()
        for process, _, _ in self.children:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        self.children, self._busy = [], set()

    def answer(self, index: int, broadcast: tuple[type, bytes] | None, decoded_broadcast: Any,
               addressed: Mapping[int, tuple[type, bytes]], cids: Sequence[int]) -> Iterator[Answer]:
        """Every client of ``cids`` answers stage ``index``, the children's in parallel with this process's; the
        answers in id order (this process's block has the lowest ids: the caller handles them while the children
        still work), up to and including each block's first failure."""
        wanted = set(cids)
        for process, connection, block in self.children:
            theirs = sorted(wanted & block)
            connection.send((index, broadcast, {cid: addressed[cid] for cid in theirs if cid in addressed}, theirs))
            self._busy.add(process.pid)
        yield from answer_all(self.clients, self.stages[index], decoded_broadcast, addressed,
                              sorted(wanted & self.local), self.inputs)
        for process, connection, _ in self.children:  # blocks in id order, each answered in id order
            try:
                wait([connection, process.sentinel])  # an answer, or the child's end
                if not connection.poll():
                    raise EOFError
                answers = connection.recv()
            except (EOFError, OSError):
                process.join(timeout=5)  # its exit code, once the kernel has it
                raise ClientProcessDied(f"a client process (pid {process.pid}) ended without answering; exit code "
                                        f"{process.exitcode}") from None
            self._busy.discard(process.pid)
            yield from answers


def forkable(clients: Mapping[int, Any]) -> bool:
    """Whether a round's clients may be split over forked processes: the ``fork`` start method exists; this
    process is not a daemonic one (which may not have children); it runs no other Python thread (a fork while
    another thread holds an import or I/O lock can deadlock the child); and no randomness object is shared by
    two clients unless it is the OS CSPRNG (:class:`Randomness` itself, fork-safe) — a copied stream would give a
    client in a child the bytes a client here drew: the same self-mask seed, Shamir coefficients and nonces."""
    if not fork_available() or multiprocessing.current_process().daemon or threading.active_count() > 1:
        return False
    owners: dict[int, int] = {}
    for cid, client in clients.items():
        randomness = getattr(client, "randomness", None)
        if randomness is None or type(randomness) is Randomness:
            continue
        if owners.setdefault(id(randomness), cid) != cid:
            return False
    return True


def default_processes(clients: int, *, per_process: int = 16) -> int:
    """How many processes an in-process round of ``clients`` uses by default: one per core this process may use
    (at most 8), and none that would hold fewer than ``per_process`` clients (a fork costs more than it saves)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8, clients // per_process))


__all__ = ["ClientHosts", "ClientProcessDied", "answer_all", "default_processes", "fork_available", "forkable",
           "split_blocks"]
