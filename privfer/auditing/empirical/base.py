"""What every canary audit shares: its outcome, the guesses, the ceiling, the distributed audits' plan."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from privfer.config import PrivferConfig
from privfer.data.clips import ClipSet
from privfer.fl.rounds import TRAINING
from privfer.fl.simulation import prepare_federation
from privfer.privacy.one_run import ceiling

KINDS = ("whitebox", "blackbox")


@dataclass
class CanaryAudit:
    """The outcome of one canary audit."""

    kind: str
    canaries: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    ceiling: float
    claimed_epsilon: float | None  # None: trained without DP
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    client: int
    records: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def audit_ceiling(canaries: int, guesses: int, delta: float) -> float:
    """The largest bound this many canaries and guesses can certify (every guess right)."""
    return ceiling(canaries, guesses, delta)


def correct_guesses(scores: np.ndarray, included: np.ndarray, guesses: int) -> int:
    """Guess "included" for the guesses/2 highest scores and "excluded" for the guesses/2 lowest; count the hits."""
    order = np.argsort(scores, kind="stable")
    half = guesses // 2
    return int(included[order[-half:]].sum() + (~included[order[:half]]).sum())


def check_counts(canaries: int, guesses: int) -> None:
    if canaries < 2 or guesses < 2 or guesses > canaries or guesses % 2:
        raise ValueError(f"need 2 <= guesses <= canaries and an even number of guesses, got {guesses} of {canaries}")


def training_plan(config: PrivferConfig, clips: ClipSet | None, canaries: int, verb: str) -> tuple[Any, Any]:
    """The federation (without adaptation) and its training phase's distributed plan, with room for the canaries
    (one model coordinate each)."""
    federation = prepare_federation(config.model_copy(update={"federation": config.federation.model_copy(
        update={"adaptation": False})}), clips)
    plan = federation.plans[TRAINING]
    if canaries > plan.dimension:
        raise ValueError(f"{canaries} canaries but the model {verb} {plan.dimension} coordinates")
    return federation, plan


__all__ = ["KINDS", "CanaryAudit", "audit_ceiling", "check_counts", "correct_guesses", "training_plan"]
