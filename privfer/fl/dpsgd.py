"""One client's DP-SGD with Opacus: the engine, its Poisson loader, ghost clipping, a persistent accountant.

The engine stays Opacus (``PrivacyEngine.make_private``); privfer supplies
the criterion Opacus's ghost clipping needs (per-example losses on request),
restores the client's accountant history before a round so its epsilon
composes over every round it trains in, and chooses where the noise and the
Poisson sampling draw their randomness:

* ``run_key`` (default) and ``run_seed`` — torch's generator, seeded by the
  caller for each client and round: from a secret key drawn from the OS for
  the run (kept only in the run's checkpoint, so a resumed run ends exactly as
  an uninterrupted one, and nobody holding the config can recompute the
  noise), or from the public run seed (reproducible experiments only).
* ``os`` — Opacus's secure mode (noise as a sum of Gaussians, robust to the
  floating-point attack of Jin et al. / Haney et al.) with a generator seeded
  from 64 bits of the OS CSPRNG for every client and round. Opacus's own
  secure mode wants ``torchcsprng``, which has no build for this torch; the
  generator itself is torch's Mersenne Twister, so this is unpredictable but
  not a cryptographic generator — docs/privacy-accounting.md says so.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn

from privfer.models.loss import LabelLoss, TrainingObjective


@dataclass
class PrivateTraining:
    """What ``make_private_training`` hands back: Opacus's wrapped objects and the engine (for its accountant)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    loader: torch.utils.data.DataLoader
    engine: PrivacyEngine

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self.engine.accountant.history)


def make_private_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: str,
    history: list[tuple[float, float, int]] | None = None,
    noise_source: str = "run_key",
    criterion: TrainingObjective | None = None,
) -> PrivateTraining:
    """Opacus DP-SGD (Poisson sampling, ghost clipping) whose accountant continues from ``history``; the
    ``criterion`` (the training objective; the label loss by default) gives per-example losses on request."""
    if noise_source not in ("run_key", "run_seed", "os"):
        raise ValueError(f"noise_source must be 'run_key', 'run_seed' or 'os', got {noise_source!r}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")  # the choice is the user's, documented
        engine = PrivacyEngine(accountant=accountant)
        engine.accountant.history = [tuple(h) for h in (history or [])]
        if noise_source == "os":
            engine.secure_mode = True  # Opacus's robust noise sampling; the generator below replaces torchcsprng
            engine.secure_rng = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        module, dp_optimizer, criterion, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode="ghost",
            criterion=LabelLoss() if criterion is None else criterion.with_reduction("mean"),
        )
    return PrivateTraining(module, dp_optimizer, criterion, dp_loader, engine)


__all__ = ["PrivateTraining", "make_private_training"]
