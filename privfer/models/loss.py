"""The training objective of the VFER: one object every trainer minimises.

The label term is the KL divergence to the annotators' vote distribution
(partial labels) or the cross-entropy to a class (discrete labels, pseudo
labels). A strategy may add per-clip terms (functions of one clip's logits and
target) and give each clip a weight in [0, 1] (how much it counts: a label
refinement's reliability); :class:`TrainingObjective` combines them, and the
centralized baseline, the local trainer (also under Opacus, whose ghost
clipping calls it for per-example losses), the stacked trainer and the
distributed clipped sums all call it. A new loss term is written once.

Every term and weight is per clip, and the mean divides by the number of clips
in the batch (not by the weights' sum): one clip's loss depends on that clip
alone, which per-example clipping (record-level DP) and the batched clipped
sums require.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

# (logits (B, classes), targets (B, classes) vote distributions or (B,) classes) -> (B,) one loss per clip
PerClipTerm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
REDUCTIONS = ("mean", "sum", "none")


def label_term(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL divergence to vote distributions (float targets) or cross-entropy to classes (integer targets), per clip."""
    if targets.dtype.is_floating_point:
        # kl_div treats 0 * log 0 as 0, so zero-vote classes add nothing.
        return F.kl_div(F.log_softmax(logits, dim=-1), targets, reduction="none").sum(dim=-1)
    return F.cross_entropy(logits, targets, reduction="none")


class TrainingObjective(nn.Module):
    """``w_i x (label_term_i + sum_k c_k term_k,i)`` per clip, reduced by ``reduction``.

    ``terms``: ``(name, coefficient, per-clip term)`` triples a strategy adds.
    ``reduction`` is "mean" (over clips: KL's batchmean), "sum" or "none" (one
    loss per clip, which Opacus's ghost clipping asks for). ``weights`` (one
    per clip, in [0, 1]; None: every clip counts fully) multiply each clip's
    loss.
    """

    def __init__(self, reduction: str = "mean", terms: Sequence[tuple[str, float, PerClipTerm]] = ()) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.terms = tuple(terms)
        for name, coefficient, term in self.terms:
            if not callable(term) or not isinstance(coefficient, (int, float)):
                raise TypeError(f"objective term {name!r}: needs a number and a callable (logits, targets) -> loss")

    def with_reduction(self, reduction: str) -> "TrainingObjective":
        """The same objective (a subclass keeps its own ``per_clip``) reduced otherwise."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        copied = copy.copy(self)
        copied.reduction = reduction
        return copied

    def per_clip(self, logits: torch.Tensor, targets: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
        """One loss per clip (B,)."""
        loss = label_term(logits, targets)
        for name, coefficient, term in self.terms:
            value = term(logits, targets)
            if value.shape != loss.shape:
                raise ValueError(f"objective term {name!r} gave shape {tuple(value.shape)}, not one loss per clip "
                                 f"{tuple(loss.shape)}")
            loss = loss + coefficient * value
        if weights is not None:
            loss = loss * weights.to(loss.dtype)
        return loss

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        per_clip = self.per_clip(logits, targets, weights)
        if self.reduction == "none":
            return per_clip
        if self.reduction == "sum":
            return per_clip.sum()
        return per_clip.mean() if len(per_clip) else per_clip.sum()


class LabelLoss(TrainingObjective):
    """The objective without terms or weights: the label term alone."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction)


def label_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean label term over clips (KL's batchmean; cross-entropy's mean)."""
    return LabelLoss()(logits, targets)


__all__ = ["LabelLoss", "PerClipTerm", "TrainingObjective", "label_loss", "label_term"]
