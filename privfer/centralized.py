"""Centralized (non-private) VFER baseline: the seed paper's training and evaluation.

Adam, lr 1e-4, 20 epochs; the epoch with the lowest validation loss is kept.
Partial labels train with KL divergence to the vote distribution, discrete
labels with cross-entropy to the majority vote. Evaluation is on the test
actors' evaluation halves (their adaptation halves are reserved for federated
adaptation), reporting per-class precision / recall / F1 and micro / macro means.

A run directory makes the run resumable: a checkpoint is written atomically
after every epoch, and re-running with the same config continues from it.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from privfer.config import PrivferConfig
from privfer.data import load_clips
from privfer.data.clips import ClipSet
from privfer.data.labels import evaluation_labels, training_targets
from privfer.data.splits import split_run
from privfer.evaluation import evaluate, predict, pseudo_label_quality
from privfer.metrics import classification_report
from privfer.models.loss import label_loss
from privfer.models.vfer import VFER
from privfer.runs import atomic_torch_save, atomic_write_json, load_checkpoint, prepare_run_dir, save_checkpoint

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_macro_f1: float
    seconds: float


def train_centralized(
    config: PrivferConfig,
    run_dir: Path | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    clips: ClipSet | None = None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train the VFER on the training actors and evaluate the best-validation epoch.

    ``on_start(first_epoch)`` is called once the data, split and run directory
    are ready and training begins; ``on_epoch(record)`` after every epoch.
    Returns the result dictionary that is also written to ``run_dir/result.json``.
    With ``run_dir``, the resolved config, the split and per-epoch checkpoints
    are written there too, and an interrupted run resumes from its checkpoint.
    """
    started = time.perf_counter()
    training = config.training
    if training.torch_threads is not None:
        torch.set_num_threads(training.torch_threads)

    # Everything that can fail on bad data or settings happens before the run
    # directory is touched, so a mistake leaves nothing behind to clean up.
    clips = load_clips(config.data) if clips is None else clips
    split, parts = split_run(clips, config.data, config.seed)
    temperature = config.data.partial_label_temperature
    train_y = training_targets(parts["train"], training.labels, temperature)
    val_y = training_targets(parts["val"], training.labels, temperature)
    pseudo = pseudo_label_quality(config, parts["train"], parts["test_adapt"])

    resumed = prepare_run_dir(run_dir, config, "train") if run_dir is not None else False
    if resumed and (run_dir / RESULT).exists():
        return json.loads((run_dir / RESULT).read_text(encoding="utf-8"))  # finished earlier
    train_x = torch.from_numpy(parts["train"].features)
    train_t = torch.from_numpy(train_y)

    torch.manual_seed(config.seed)
    model = VFER.from_config(config.model, clips.feature_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    shuffler = torch.Generator().manual_seed(config.seed)
    history: list[EpochRecord] = []
    best_state = copy.deepcopy(model.state_dict())
    best_val, best_epoch, start_epoch = float("inf"), 0, 1
    elapsed_before = 0.0

    checkpoint_path = run_dir / CHECKPOINT if run_dir is not None else None
    state = load_checkpoint(checkpoint_path, resumed)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        shuffler.set_state(state["shuffler"])
        torch.set_rng_state(state["torch_rng"])
        best_state, best_val, best_epoch = state["best_state"], state["best_val"], state["best_epoch"]
        history = [EpochRecord(**r) for r in state["history"]]
        start_epoch = state["epoch"] + 1
        elapsed_before = state["elapsed"]

    if on_start is not None:
        on_start(start_epoch)
    for epoch in range(start_epoch, training.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_x), generator=shuffler)
        total, seen = 0.0, 0
        for start in range(0, len(order), training.batch_size):
            batch = order[start : start + training.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = label_loss(model(train_x[batch]), train_t[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            seen += len(batch)
        val_logits = predict(model, parts["val"].features)
        val_loss = float(label_loss(torch.from_numpy(val_logits), torch.from_numpy(val_y)))
        val_truth = evaluation_labels(parts["val"], config.data.eval_target)
        val_f1 = classification_report(val_truth, val_logits.argmax(axis=1))["macro"]["f1"]
        if val_loss < best_val:
            best_val, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        record = EpochRecord(epoch, total / max(seen, 1), val_loss, val_f1, time.perf_counter() - epoch_start)
        history.append(record)
        if checkpoint_path is not None:
            save_checkpoint(
                checkpoint_path,
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "shuffler": shuffler.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "best_state": best_state,
                    "best_val": best_val,
                    "best_epoch": best_epoch,
                    "history": [asdict(r) for r in history],
                    "elapsed": elapsed_before + time.perf_counter() - started,
                },
            )
        if on_epoch is not None:
            on_epoch(record)

    model.load_state_dict(best_state)
    result: dict[str, Any] = {
        "command": "train",
        "labels": training.labels,
        "eval_target": config.data.eval_target,
        "best_epoch": best_epoch,
        "best_val_loss": best_val,
        "test": evaluate(model, parts["test_eval"], config.data.eval_target),
        "test_all_clips": evaluate(model, parts["test"], config.data.eval_target),
        "val": evaluate(model, parts["val"], config.data.eval_target),
        "history": [asdict(r) for r in history],
        "pseudo_labels": pseudo,
        "data": {
            "source": config.data.source,
            "clips": len(clips),
            "actors": len(clips.actors),
            "frames": clips.frames,
            "feature_dim": clips.feature_dim,
            "train_clips": len(parts["train"]),
            "val_clips": len(parts["val"]),
            "test_eval_clips": len(parts["test_eval"]),
        },
        "seconds": elapsed_before + time.perf_counter() - started,
    }
    if run_dir is not None:
        atomic_write_json(run_dir / "split.json", split.to_dict())
        if config.output.save_model:
            atomic_torch_save(run_dir / "model.pt", best_state)
        atomic_write_json(run_dir / RESULT, result)
        checkpoint_path.unlink(missing_ok=True)  # the result supersedes it
    return result
