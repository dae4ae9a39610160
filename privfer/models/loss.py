"""The training loss of the VFER: KL divergence to the annotators' vote distribution (partial labels), or
cross-entropy to a class (discrete labels, pseudo labels). One home for the centralized baseline, DP-SGD and the
distributed clipped sums."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class LabelLoss(nn.Module):
    """KL divergence to vote distributions (float targets) or cross-entropy to classes (integer targets).

    ``reduction`` is "mean" (over clips: KL's batchmean), "sum" or "none"
    (one loss per clip, which Opacus's ghost clipping asks for).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.dtype.is_floating_point:
            # kl_div treats 0 * log 0 as 0, so zero-vote classes add nothing.
            per_clip = F.kl_div(F.log_softmax(logits, dim=-1), targets, reduction="none").sum(dim=-1)
        else:
            per_clip = F.cross_entropy(logits, targets, reduction="none")
        if self.reduction == "none":
            return per_clip
        if self.reduction == "sum":
            return per_clip.sum()
        return per_clip.mean() if len(per_clip) else per_clip.sum()


def label_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean :class:`LabelLoss` over clips (KL's batchmean; cross-entropy's mean)."""
    return LabelLoss()(logits, targets)


__all__ = ["LabelLoss", "label_loss"]
