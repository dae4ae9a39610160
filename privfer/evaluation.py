"""How a trained model is scored, whichever way it was trained: logits for clips, the seed paper's table, and the
quality of the IFER's pseudo labels. The centralized baseline, the simulation and the Flower example all score
through here."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from privfer.config import PrivferConfig
from privfer.data.clips import ClipSet
from privfer.data.labels import evaluation_labels, pseudo_labels
from privfer.metrics import classification_report
from privfer.models.vfer import ifer_from_config


@torch.no_grad()
def predict(model: nn.Module, features: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(N, T, D) -> (N, classes) logits, in evaluation mode."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    chunks = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    if not chunks:
        return np.zeros((0, model(torch.zeros(1, *x.shape[1:])).shape[-1]), np.float32)
    return torch.cat(chunks).numpy()


def evaluate(model: nn.Module, clips: ClipSet, eval_target: str) -> dict[str, Any]:
    """The seed paper's table for ``clips``."""
    predicted = predict(model, clips.features).argmax(axis=1)
    return classification_report(evaluation_labels(clips, eval_target), predicted)


def pseudo_label_report(clips: ClipSet, labels: np.ndarray, keep: np.ndarray, data: Any) -> dict[str, Any]:
    """Coverage and accuracy of pseudo labels ``labels`` (kept where ``keep``) on ``clips``."""
    truth = evaluation_labels(clips, data.eval_target)
    return {
        "clips": len(clips),
        "kept": int(keep.sum()),
        "kept_fraction": float(keep.mean()) if len(keep) else 0.0,
        "accuracy_of_kept": float((labels[keep] == truth[keep]).mean()) if keep.any() else 0.0,
        "threshold": data.pseudo_label_threshold,
    }


def pseudo_label_quality(config: PrivferConfig, training: ClipSet, adaptation: ClipSet) -> dict[str, Any]:
    """How good the IFER's pseudo labels are on the adaptation halves (the seed paper's self-supervision)."""
    ifer = ifer_from_config(config.model, training, config.seed)
    labels, keep = pseudo_labels(ifer.frame_probabilities(adaptation.features), config.data.pseudo_label_threshold)
    return pseudo_label_report(adaptation, labels, keep, config.data)


__all__ = ["evaluate", "predict", "pseudo_label_quality", "pseudo_label_report"]
