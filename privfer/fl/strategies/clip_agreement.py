"""Clip agreement (after RDFER: Liu, Wang, Shen, "Robust Dynamic Facial Expression Recognition", IEEE TBIOM 2025):
tell noisy labels from hard clips by whether the sub-clips of one clip agree.

Each round, before it trains, a client runs the model it received on K
sub-clips of each of its clips (windows of ``window`` x T frames, their starts
evenly spaced from the first frame to the last possible one) and reads each
sub-clip's predicted class. Per clip:

* **noisy**: at least ``agreement`` of the K sub-clips name the same class,
  it is not the clip's label (its class, or any class with the most votes of
  its vote distribution: a tie is never read as a disagreement), and the
  sub-clips' mean probability of that class reaches ``confidence``. The
  whole clip consistently shows something else: its label is likely wrong.
  Then, per ``noisy``: ``weight`` multiplies its loss by ``noisy_weight``;
  ``relabel`` trains it on the sub-clips' class instead.
* **hard**: the sub-clips disagree (no class reaches ``agreement``): a short
  apex, a subtle or mixed expression. Such a clip is worth learning (the
  paper's point) and keeps its label and full weight.
* otherwise (the sub-clips agree with the label) nothing changes.

For the first ``warmup`` rounds of the run (the federation's rounds, not the
client's own turns) a client trains on its own labels: an untrained model's
agreement means nothing. A weak model's sub-clips agree with each other more
often than the model is right (stop 42's measurement): ``confidence`` asks the
agreed class to be believed, not only repeated. (RDFER samples the sub-clips at
random and also re-samples a key segment for a dual-stream network; privfer's
windows are fixed; the dual-stream model is ``model.architecture: dual_stream``,
which this strategy runs like any model: each sub-clip is a clip to it.)

Privacy. A clip's new target and weight are a function of that clip alone
and of the model the client received (the server's post-processed release),
never of the client's other clips: one record's contribution to a round is
still its own clipped gradient, now of ``w x loss(target')`` with w in
[0, 1]. So record-level DP's sensitivity bound holds unchanged, and the
strategy runs under every mechanism (docs/privacy-accounting.md, "What a
strategy may do with a client's clips"). It keeps no per-client state. (The
sub-clips of a client's clips run as one batch: as for every per-sample
gradient of DP-SGD, a clip's result is its own up to floating-point rounding,
which a batch's other rows may change in the last bits.)
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from privfer.config import FederationConfig
from privfer.data.clips import NUM_CLASSES
from privfer.fl.rounds import TRAINING
from privfer.fl.strategies.base import ClientData
from privfer.fl.strategies.fedavg import FedAvg
from privfer.models.vfer import VFER

CLEAN, HARD, NOISY = 0, 1, 2  # what agreement_split calls each clip


class ClipAgreementOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subclips: int = Field(4, ge=2, le=32, description="Sub-clips per clip (K).")
    window: float = Field(0.5, gt=0.0, lt=1.0, description="Each sub-clip's length, as a share of the clip's frames "
                          "(at least 2 frames).")
    agreement: float = Field(0.75, gt=0.5, le=1.0, description="Share of the sub-clips that must name one class for "
                             "the clip to count as consistent (above a half, so at most one class can reach it).")
    noisy: Literal["weight", "relabel"] = Field("weight", description="What a noisy clip gets: its loss weighted by "
                                                "noisy_weight, or the sub-clips' class as its target.")
    noisy_weight: float = Field(0.0, ge=0.0, le=1.0, description="The loss weight of a noisy clip (noisy: weight).")
    confidence: float = Field(0.7, ge=0.0, le=1.0, description="The sub-clips' mean probability of the class they "
                              "agree on that a noisy clip needs (0: agreement alone, as the paper; docs/studies.md "
                              "for why 0.7).")
    warmup: int = Field(10, ge=0, le=100_000, description="Rounds of the run in which clients train on their own "
                        "labels.")


def windows(frames: int, subclips: int, window: float) -> list[tuple[int, int]]:
    """``subclips`` (start, end) frame ranges of ``max(2, round(window x frames))`` frames, starts evenly spaced
    from 0 to the last possible one (windows repeat when the clip is too short to give that many)."""
    length = min(frames, max(2, int(round(window * frames))))
    starts = np.linspace(0, frames - length, subclips).round().astype(int)
    return [(int(s), int(s) + length) for s in starts]


def agreement_split(subclip_classes: np.ndarray, labels: np.ndarray, agreement: float,
                    confidence: np.ndarray | None = None, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) sub-clip predictions and the clips' labels -> (N,) CLEAN / HARD / NOISY and (N,) the class the
    sub-clips agree on (-1 where none reaches ``agreement`` of them).

    ``labels``: (N,) classes, or (N, C) booleans marking each clip's label classes (every class tied for the most
    votes). ``confidence`` (N, C): the sub-clips' mean probabilities; a consistent clip whose agreed class is not
    its label is NOISY only when its mean probability reaches ``threshold``, HARD otherwise."""
    subclip_classes = np.asarray(subclip_classes)
    n, k = subclip_classes.shape
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = np.eye(NUM_CLASSES, dtype=bool)[labels]
    counts = np.stack([(subclip_classes == c).sum(axis=1) for c in range(NUM_CLASSES)], axis=1)  # (N, C)
    top = counts.argmax(axis=1)  # above a half of the sub-clips: at most one class is consistent
    consistent = counts[np.arange(n), top] >= agreement * k - 1e-9
    consensus = np.where(consistent, top, -1)
    agrees = labels[np.arange(n), top]
    believed = np.ones(n, dtype=bool) if confidence is None else np.asarray(confidence)[np.arange(n), top] >= threshold
    kind = np.full(n, HARD)
    kind[consistent & agrees] = CLEAN
    kind[consistent & ~agrees & believed] = NOISY
    return kind, consensus


class ClipAgreement(FedAvg):
    """FedAvg's sharing; each client down-weights or relabels the clips whose sub-clips agree on another class."""

    name = "clip_agreement"
    title = "clip agreement (RDFER)"
    Options = ClipAgreementOptions

    def __init__(self, options: ClipAgreementOptions | None = None) -> None:
        self.options = options or ClipAgreementOptions()

    @classmethod
    def from_config(cls, config: FederationConfig, options: Any) -> "ClipAgreement":
        return cls(options)

    @torch.no_grad()
    def probabilities(self, model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
        """(N, T, D) clips -> (N, K, classes): ``model``'s class probabilities for each clip's K sub-clips."""
        model.eval()
        o = self.options
        return torch.stack([torch.softmax(model(features[:, start:end]), dim=-1)
                            for start, end in windows(features.shape[1], o.subclips, o.window)], dim=1)

    def split(self, model: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor,
              probabilities: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each clip's CLEAN / HARD / NOISY and the sub-clips' class (:func:`agreement_split`) under ``model``
        (its sub-clips' ``probabilities`` when already computed)."""
        if probabilities is None:
            probabilities = self.probabilities(model, features)
        if targets.dtype.is_floating_point:  # every class tied for the most votes is the clip's label
            labels = targets == targets.max(dim=-1, keepdim=True).values
        else:
            labels = torch.nn.functional.one_hot(targets.long(), NUM_CLASSES).bool()
        return agreement_split(probabilities.argmax(dim=-1).cpu().numpy(), labels.cpu().numpy(),
                               self.options.agreement, probabilities.mean(dim=1).cpu().numpy(),
                               self.options.confidence)

    def client_data(self, phase: str, client_id: int, features: torch.Tensor, targets: torch.Tensor,
                    model: Callable[[], VFER], state: Any, *, round_index: int = 0) -> tuple[ClientData | None, Any]:
        if phase != TRAINING or round_index < self.options.warmup:
            return None, state
        kind, consensus = self.split(model(), features, targets)
        noisy = torch.from_numpy(kind == NOISY)
        if not bool(noisy.any()):
            return None, state
        if self.options.noisy == "weight":
            weights = torch.ones(len(targets), dtype=torch.float32)
            weights[noisy] = self.options.noisy_weight
            return ClientData(targets, weights), state
        relabelled = targets.clone()
        agreed = torch.from_numpy(consensus[kind == NOISY]).to(targets.device)
        if targets.dtype.is_floating_point:
            relabelled[noisy] = torch.nn.functional.one_hot(agreed, NUM_CLASSES).to(targets.dtype)
        else:
            relabelled[noisy] = agreed.to(targets.dtype)
        return ClientData(relabelled), state


__all__ = ["ClipAgreement"]
