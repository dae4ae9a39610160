"""Federated VFER training in one process: private clients, a strategy, secure aggregation, two phases.

Phase 1 (training): each round samples ``clients_per_round`` of the training
actors; each trains the VFER on its clips with partial labels (DP-SGD when
private), some drop out at a random protocol stage, the survivors' updates
are securely summed, and the strategy applies the weighted mean.
Phase 2 (adaptation, optional, as in the seed paper): the test actors train
on their adaptation halves with the IFER's pseudo labels (mean frame
probabilities, top probability > threshold), lr 1e-5, 1 epoch; the model is
evaluated on their evaluation halves.

Under FedPer the test actors are newcomers without a personal head: they
start from the example-weighted mean of the training clients' heads, summed
through the same secure aggregation once at the end of phase 1, and
personalize it in phase 2.

A checkpoint is written before the first round (it holds the run key and
torch's generator) and after every round, atomically; rerunning the same
command on the same run directory continues after the last finished round
(a round killed before its checkpoint runs again with the same key, inputs,
noise and dropout masks, so it releases nothing new) and ends with the same
result as an uninterrupted run (exactly, with the plain aggregator and the
run key kept in the checkpoint (``privacy.noise_source: run_key``);
masking's stochastic rounding draws from the OS and moves the last bits).
Under ``privacy.noise_source: os`` a re-run would draw fresh noise, so a
private run killed inside a round is refused (``round_in_flight.json``).
One process holds a run directory at a time (``.lock``).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from privfer.config import PrivferConfig
from privfer.data.clips import ClipSet
from privfer.data.labels import evaluation_labels
from privfer.errors import RunDirectoryError
from privfer.evaluation import predict
from privfer.fl.aggregation import sum_updates
from privfer.fl.federation import Federation, RunState, prepare_federation
from privfer.fl.mechanisms import public_client_seed
from privfer.fl.results import AggregationSummary, DataSummary, PrivacySummary, RoundCounts, SimulationResult
from privfer.fl.rounds import ADAPTATION, TRAINING, RoundRecord
from privfer.metrics import classification_report
from privfer.models.vfer import VFER
from privfer.privacy.ledger import Ledger, write_ledger
from privfer.runs import atomic_torch_save, atomic_write_json, load_checkpoint, prepare_run_dir, save_checkpoint
from privfer.secagg.backends import BACKENDS

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
LEDGER = "privacy_ledger.json"
IFER_NOT_COVERED = ("the IFER that pseudo-labels phase 2 is fitted on the training actors' frames without DP (it stands "
                    "in for a public pretrained model); set model.ifer_weights to use one")
ROUNDS = "rounds.json"
# under privacy.noise_source os, the round a private run is in (written before it runs): a re-run would draw fresh
# noise, a second release of that round the ledger cannot charge, so a run killed inside one is not resumed
IN_FLIGHT = "round_in_flight.json"
LOCK = ".lock"  # held (flock) while a process runs the directory


def _schedule(config: PrivferConfig, federation: Federation) -> list[tuple[str, int]]:
    steps = [(TRAINING, r) for r in range(1, config.federation.rounds + 1)]
    if federation.clients[ADAPTATION]:
        steps += [(ADAPTATION, r) for r in range(1, config.federation.adaptation_rounds + 1)]
    return steps


def predicted_classes(federation: Federation, state: RunState, clips: ClipSet, phase: str) -> np.ndarray:
    """The class each clip of ``clips`` is predicted as; the strategy picks the model each actor is scored with
    (in the training phase, an actor without a personal head is a newcomer)."""

    def scores(actor: int | None, features: np.ndarray) -> np.ndarray:
        head: dict[str, torch.Tensor] = {}
        if actor is not None:
            head = state.personal.get(actor) if phase == ADAPTATION else None
            head = head if head is not None else state.newcomer_head
        return predict(federation.model({**state.global_state, **head}), features)

    return federation.strategy.predict(clips.features, clips.actor_ids, scores).argmax(axis=1)


def _evaluate(federation: Federation, state: RunState, clips: ClipSet, phase: str) -> dict[str, Any]:
    """Macro/micro/per-class scores on ``clips``."""
    predicted = predicted_classes(federation, state, clips, phase)
    return classification_report(evaluation_labels(clips, federation.config.data.eval_target), predicted)


def _run_round(federation: Federation, state: RunState, phase: str, round_index: int) -> RoundRecord:
    """The mechanism's round, then (FedAvg, training phase) the validation score the simulation reports; a run
    without DP keeps the model of its best validation round (``federation.keep_best_round``, early stopping:
    choosing by the validation actors' clips is free without DP, and under DP it would release a choice made from
    people the ledger does not cover)."""
    record = federation.mechanism.run_round(federation, state, phase, round_index)
    if phase == TRAINING and federation.strategy.one_global_model:
        record.val_macro_f1 = _evaluate(federation, state, federation.parts["val"], phase)["macro"]["f1"]
        improved = state.best is None or record.val_macro_f1 > state.best["val_macro_f1"]
        keep = federation.config.federation.keep_best_round and not federation.private
        if keep and state.selecting and record.aborted is None and improved:
            state.best = {"round": round_index, "val_macro_f1": record.val_macro_f1,
                          "global": {name: value.detach().clone() for name, value in state.global_state.items()}}
    return record


def _newcomer_head(federation: Federation, state: RunState) -> dict[str, torch.Tensor] | None:
    """The strategy's start for newcomers (FedPer: the securely summed, example-weighted mean of the heads)."""
    trained = sorted(c for c in state.personal if (TRAINING, c) in state.accounts)
    heads = {c: state.personal[c] for c in trained}
    weights = {c: federation.clients[TRAINING][c].records for c in trained}

    def weighted_mean(heads: dict, weights: dict) -> dict[str, torch.Tensor]:
        summed = sum_updates(heads, weights, None, federation.config.aggregation,
                             round_id=f"{state.nonce}:newcomer-head", weight_scale=max(weights.values()))
        if summed.aborted is not None:
            raise RuntimeError(f"the newcomer head could not be aggregated: {summed.aborted}")
        if summed.clipped:
            warnings.warn(
                f"{summed.clipped} values of the clients' heads exceeded aggregation.clipping_range "
                f"{federation.config.aggregation.clipping_range:g} and were clipped in the newcomer head",
                stacklevel=2,
            )
        return {name: (value / summed.total_weight).float() for name, value in summed.weighted_sum.items()}

    return federation.strategy.newcomer_head(heads, weights, weighted_mean)


def simulate(
    config: PrivferConfig,
    run_dir: Path | None = None,
    *,
    clips: ClipSet | None = None,
    on_start: Callable[[Federation, int, int], None] | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> SimulationResult:
    """Run the federation; with ``run_dir`` write checkpoints, rounds, the ledger and result.json there."""
    started = time.perf_counter()
    if config.training.torch_threads is not None:
        torch.set_num_threads(config.training.torch_threads)
    federation = prepare_federation(config, clips)
    prepared_seconds = time.perf_counter() - started
    resumed = prepare_run_dir(run_dir, config, "simulate") if run_dir is not None else False
    if resumed and (run_dir / RESULT).exists():
        return read_result(run_dir)
    with _exclusive(run_dir):
        return _simulate(config, run_dir, federation, resumed, started, prepared_seconds, on_start, on_round)


@contextlib.contextmanager
def _exclusive(run_dir: Path | None) -> Iterator[None]:
    """Hold the run directory alone: two processes resuming one run would each release its next rounds (under fresh
    OS noise, twice with independent noise, charged once). The OS drops the lock when the process dies."""
    if run_dir is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # no flock (Windows): nothing to hold
        yield
        return
    with open(run_dir / LOCK, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryError(f"{run_dir} is in use by another privfer process; wait for it or choose another "
                                    "--out") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _simulate(config: PrivferConfig, run_dir: Path | None, federation: Federation, resumed: bool, started: float,
              prepared_seconds: float, on_start: Callable[[Federation, int, int], None] | None,
              on_round: Callable[[RoundRecord], None] | None) -> SimulationResult:
    if resumed and (run_dir / RESULT).exists():  # another process finished it while this one waited to start
        return read_result(run_dir)

    torch.manual_seed(config.seed)
    initial = VFER.from_config(config.model, federation.feature_dim, private=federation.private)
    state = RunState(global_state={k: v.detach().clone() for k, v in initial.state_dict().items()}, personal={},
                   accounts={})
    checkpoint = run_dir / CHECKPOINT if run_dir is not None else None
    saved = load_checkpoint(checkpoint, resumed)
    if saved is not None:
        state = RunState.from_checkpoint(saved)
        if state.plans_sha256 is not None and state.plans_sha256 != federation.plans_sha256:
            raise RunDirectoryError(
                f"{run_dir} was calibrated with other noise plans than this privfer makes for its config (its "
                "calibration changed since the run started): resuming would account its rounds under the wrong plan; "
                "finish it with the privfer that started it, or start a new run (its released rounds stay spent)")
    elif resumed:  # the first checkpoint is written before any round: without it, released rounds cannot be known
        raise RunDirectoryError(f"{run_dir} was started but has no {CHECKPOINT}: rounds it may have released could "
                                "not be accounted if it trained again (with a new run key); delete the directory to "
                                "start a new run (any rounds it released stay spent)")
    state.plans_sha256 = federation.plans_sha256
    if state.torch_rng is not None:  # where the last checkpoint left torch's generator (dropout masks)
        torch.set_rng_state(state.torch_rng)
    fresh_noise = run_dir is not None and federation.private and config.privacy.noise_source == "os"
    if checkpoint is not None and saved is None:  # the run key on disk before any round can release a sum under it
        if fresh_noise:
            atomic_write_json(run_dir / IN_FLIGHT, {"round": 0})
        _save(checkpoint, state)
    schedule = _schedule(config, federation)
    done = len(state.records)
    if fresh_noise and resumed and not (run_dir / IN_FLIGHT).exists():
        raise RunDirectoryError(f"{run_dir} has no {IN_FLIGHT} (it was started by a privfer that did not record the "
                                "round in flight): whether a round was released cannot be known, and with "
                                "privacy.noise_source os a re-run draws fresh noise; start a new run")
    if fresh_noise and resumed and _in_flight(run_dir) > done:
        raise RunDirectoryError(
            f"{run_dir} was killed inside round {_in_flight(run_dir)}, which may have released its sum; with "
            "privacy.noise_source os a re-run draws fresh noise, a second release the ledger cannot charge: start a "
            "new run (the rounds it released stay spent); privacy.noise_source run_key re-runs a round identically")
    if on_start is not None:
        on_start(federation, done, len(schedule))
    for phase, round_index in schedule[done:]:
        if phase == ADAPTATION and state.after_training is None:
            _finish_training_phase(federation, state)
        round_started = time.perf_counter()
        if fresh_noise:
            atomic_write_json(run_dir / IN_FLIGHT, {"round": len(state.records) + 1})
        record = _run_round(federation, state, phase, round_index)
        state.records.append(record)
        state.elapsed += time.perf_counter() - round_started
        if run_dir is not None:
            _save(checkpoint, state)
            atomic_write_json(run_dir / ROUNDS, [asdict(r) for r in state.records])
        if on_round is not None:
            on_round(record)
    finish_started = time.perf_counter()
    if state.after_training is None:
        _finish_training_phase(federation, state)
    adapted = any(r.phase == ADAPTATION for r in state.records)
    final = _evaluate(federation, state, federation.parts["test_eval"], ADAPTATION) if adapted else state.after_training
    ledger = _ledger(federation, state)
    state.elapsed += time.perf_counter() - finish_started
    result = _result(federation, state, final, adapted, ledger, prepared_seconds)
    if run_dir is not None:
        atomic_write_json(run_dir / ROUNDS, [asdict(r) for r in state.records])  # also after a kill between writes
        write_ledger(run_dir / LEDGER, ledger)
        if config.output.save_model:
            atomic_torch_save(run_dir / "model.pt", {"global": state.global_state, "personal": state.personal,
                                                     "newcomer_head": state.newcomer_head})
        atomic_write_json(run_dir / RESULT, result.to_json())
        checkpoint.unlink(missing_ok=True)  # the result supersedes it
        (run_dir / IN_FLIGHT).unlink(missing_ok=True)
    return result


def _in_flight(run_dir: Path) -> int:
    """The round (1-based, over both phases) a run under fresh OS noise was in when it stopped (0: none recorded)."""
    path = run_dir / IN_FLIGHT
    if not path.exists():
        return 0
    try:
        value = json.loads(path.read_text(encoding="utf-8"))["round"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise RunDirectoryError(f"{path} is unreadable: whether a round was released cannot be known; start a new "
                                "run") from None
    if not isinstance(value, int) or isinstance(value, bool):
        raise RunDirectoryError(f"{path} is not a round number: start a new run")
    return value


def _save(checkpoint: Path, state: RunState) -> None:
    """The run's state with torch's generator as it is now: a round resumed after a kill draws what it drew."""
    state.torch_rng = torch.get_rng_state()
    save_checkpoint(checkpoint, state.to_checkpoint())


def read_result(run_dir: Path) -> SimulationResult:
    """A finished run's result.json (RunDirectoryError if it is not a complete simulate result)."""
    path = Path(run_dir) / RESULT
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirectoryError(f"{path} cannot be read ({exc.__class__.__name__}); delete it to rerun") from None
    return SimulationResult.from_json(raw, str(path))


def _finish_training_phase(federation: Federation, state: RunState) -> None:
    if state.best is not None:  # a run without DP ends its training phase with its best validation round's model
        if federation.private:
            raise RunDirectoryError("the checkpoint of a private run holds a model chosen on the validation actors, "
                                    "which privfer never writes for one: it was edited; start a new run")
        state.global_state = {name: value.clone() for name, value in state.best["global"].items()}
    state.newcomer_head = _newcomer_head(federation, state)
    state.after_training = _evaluate(federation, state, federation.parts["test_eval"], TRAINING)


def _ledger(federation: Federation, state: RunState) -> Ledger:
    config = federation.config
    not_covered = [IFER_NOT_COVERED] if federation.clients[ADAPTATION] and config.model.ifer_weights is None else []
    max_rounds = {TRAINING: config.federation.rounds, ADAPTATION: config.federation.adaptation_rounds}
    return federation.mechanism.ledger(list(state.accounts.values()), federation.delta, max_rounds, not_covered)


def _result(federation: Federation, state: RunState, final: dict, adapted: bool, ledger: Ledger,
            prepared_seconds: float) -> SimulationResult:
    config = federation.config
    sigmas = federation.mechanism.noise_multipliers()
    records = state.records
    return SimulationResult(
        strategy=config.federation.strategy,
        aggregator=config.aggregation.backend,
        aggregator_private=BACKENDS[config.aggregation.backend].private,
        security=config.aggregation.resolved_security,
        private=federation.private,
        test=final,
        test_after_training=state.after_training,
        test_after_adaptation=final if adapted else None,
        privacy=PrivacySummary(
            unit=config.privacy.unit,
            mechanism=federation.mechanism.id,
            target_epsilon=config.privacy.epsilon if federation.private else None,
            delta=federation.delta,
            accountant=ledger.accountant,
            epsilon_max=ledger.epsilon_max,
            epsilon_median=ledger.epsilon_median,
            noise_multiplier_min=min(sigmas) if sigmas else None,
            noise_multiplier_max=max(sigmas) if sigmas else None,
        ),
        rounds=RoundCounts(
            training=sum(r.phase == TRAINING for r in records),
            adaptation=sum(r.phase == ADAPTATION for r in records),
            aborted=sum(r.aborted is not None for r in records),
        ),
        clients={phase: len(group) for phase, group in federation.clients.items()},
        pseudo_labels=federation.pseudo,
        selected_round=None if state.best is None else int(state.best["round"]),
        secure_aggregation=AggregationSummary(
            seconds=sum(r.aggregation_seconds for r in records),
            bytes_per_client_mean=statistics.mean(r.bytes_per_client for r in records) if records else 0.0,
            clipped_values=sum(r.clipped for r in records),
        ),
        data=DataSummary(
            source=config.data.source,
            train_clips=len(federation.parts["train"]),
            test_eval_clips=len(federation.parts["test_eval"]),
        ),
        seconds=state.elapsed + prepared_seconds,
    )


__all__ = ["Federation", "RoundRecord", "SimulationResult", "prepare_federation", "public_client_seed", "read_result",
           "simulate"]
