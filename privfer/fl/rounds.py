"""What every federated round shares, whatever the mechanism: the phases, who takes part, the round's record."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privfer.secagg import STAGES

# The stages a simulated dropout happens at: training time is where clients vanish. A dropout in the short window
# between the masked input and the consistency signature aborts an active-security round (every listed survivor
# must sign, SPEC 5.2), and would abort rounds the simulation means to keep.
DROPOUT_STAGES = tuple(stage for stage in STAGES if stage != "consistency")

TRAINING, ADAPTATION = "training", "adaptation"


@dataclass
class RoundRecord:
    """What one round did, as the server sees it (plus the simulation's validation score)."""

    phase: str
    round: int
    clients: list[int]
    included: list[int]
    dropouts: dict[str, str]
    aborted: str | None
    train_loss: float | None  # mean of the clients' mean losses, securely summed; None in private runs
    val_macro_f1: float | None
    seconds: float
    aggregation_seconds: float
    bytes_per_client: float
    clipped: int


def draw_cohort(seed: int, ids: list[int], size: int, dropout: float, phase: str,
                round_index: int) -> tuple[list[int], dict[int, str]]:
    """Who takes part in a round and who drops out at which stage, from the run seed (the same on resume)."""
    rng = np.random.default_rng([seed, 0 if phase == TRAINING else 1, round_index])
    cohort = sorted(int(c) for c in rng.choice(sorted(ids), size=size, replace=False))
    dropouts = {}
    for client in cohort:
        if rng.random() < dropout:
            dropouts[client] = DROPOUT_STAGES[int(rng.integers(len(DROPOUT_STAGES)))]
    return cohort, dropouts


def mean_bytes(bytes_sent: dict[int, int]) -> float:
    return float(np.mean(list(bytes_sent.values()))) if bytes_sent else 0.0


__all__ = ["ADAPTATION", "TRAINING", "RoundRecord", "draw_cohort", "mean_bytes"]
