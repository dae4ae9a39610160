"""Noise calibration for a whole federated run: the TOTAL per-client budget, worst-case participation.

``--epsilon E`` is the budget of one client (one person) over the whole run,
at one delta, for record-level DP (the unit is one clip). A client's DP-SGD
is Opacus's Poisson-subsampled Gaussian mechanism: with n records and batch
size B its loader holds ceil(n / B) batches per epoch and samples each record
with probability q = 1 / ceil(n / B) per step (Opacus's ``DPDataLoader``).
The noise multiplier is chosen for the worst case, a client that trains in
every round, over all its local steps:

    steps = rounds x local_epochs x ceil(n / B)

so a client sampled in fewer rounds spends less than E. Clients with the same
(q, steps) share one noise multiplier; the search is Opacus's
``get_noise_multiplier`` with the configured accountant (to 0.01 below
the target, checked with the same accountant call that fills the ledger).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Mapping

from privfer.errors import ConfigError

EPSILON_TOLERANCE = 0.01


class PrivacyBudgetError(ConfigError):
    """The requested budget cannot be met with a useful amount of noise."""


@dataclass(frozen=True)
class ClientPlan:
    """How one client will be trained and accounted in the worst case (every round)."""

    records: int
    sample_rate: float
    steps_per_epoch: int
    max_steps: int
    noise_multiplier: float | None  # None: trained without DP

    def to_dict(self) -> dict:
        return asdict(self)


def steps_per_epoch(records: int, batch_size: int) -> int:
    """Batches in one epoch of Opacus's Poisson loader, as its accountant records them.

    Opacus samples with q = 1 / k for k = ceil(records / batch_size) batches,
    but builds the loader with ``int(1 / q)`` batches and records the sample
    rate 1 / len(loader) in the accountant's history; for some k (93, 99, ...)
    the float round trip gives k - 1. Planning with the same arithmetic makes
    the calibrated noise match the recorded history (which slightly
    overstates the sampling that really happens: conservative).
    """
    if records < 1:
        raise ValueError("a client needs at least one record")
    batches = math.ceil(records / batch_size)
    return int(1 / (1 / batches))


def default_delta(record_counts: list[int]) -> float:
    """1 / (10 x the largest client's record count): at most 1 / (10 n) for every client."""
    if not record_counts:
        raise ValueError("no clients")
    return 1.0 / (10 * max(record_counts))


PRV_MAX_EPSILON = 50.0
PRV_MAX_STEPS = 100_000
"""Cost bounds of the PRV accountant. Its grid spans the privacy loss's range, so its time and memory grow
with the epsilon it computes and with the steps (measured: epsilon 45 takes 6 s and 0.4 GB, epsilon 128 takes
15 s and 2 GB, 10^6 steps 16 s and 2 GB; a hostile ledger's 10^6-step entry at little noise asked for 79 GB).
Beyond either bound the RDP bound is used instead: RDP's cost does not depend on either, and it is an upper
bound on PRV's value, so the substitution can only overstate epsilon."""


def prv_affordable(history: list[tuple[float, float, int]], delta: float) -> bool:
    """Whether PRV can evaluate ``history`` within its cost bounds (decided by the cheap RDP bound)."""
    if sum(int(t) for _, _, t in history) > PRV_MAX_STEPS:
        return False
    return _rdp_epsilon(_key(history), float(delta)) <= PRV_MAX_EPSILON


def _key(history: list[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    return tuple((float(s), float(q), int(t)) for s, q, t in history)


@lru_cache(maxsize=1024)
def _rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """The RDP bound, cached: the cost check and an RDP-routed or RDP-requested value ask for the same one."""
    return _opacus_epsilon(list(history), delta, "rdp")


def epsilon_spent(history: list[tuple[float, float, int]], delta: float, accountant: str = "prv") -> float:
    """Epsilon of an Opacus accountant ``history`` of (noise multiplier, sample rate, steps) at ``delta``.

    ``prv`` beyond :data:`PRV_MAX_EPSILON` or :data:`PRV_MAX_STEPS` returns the RDP bound (see there)."""
    if not history:
        return 0.0
    if accountant == "prv" and not prv_affordable(history, delta):
        accountant = "rdp"
    if accountant == "rdp":
        return _rdp_epsilon(_key(history), float(delta))
    return _opacus_epsilon(history, delta, accountant)


def _opacus_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    with warnings.catch_warnings():
        # RDP warns when its best order is the largest tried, PRV on log(0) in its grid (neither changes
        # the bound), GDP that it is experimental (docs/privacy-accounting.md says so once).
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        acc = create_accountant(mechanism=accountant)
        acc.history = [(float(s), float(q), int(t)) for s, q, t in history]
        return float(acc.get_epsilon(delta=delta))


MIN_NOISE_MULTIPLIER = 0.05
"""The search never goes below this noise multiplier: a budget so large that less noise would do (epsilon in
the hundreds) gets this much, slightly more than needed, and the search stays a few dozen evaluations long."""


def _bisect(eps, epsilon: float, low: float, high: float, cap: float) -> float:
    """The smallest sigma in (low, ...] with eps(sigma) <= epsilon, to EPSILON_TOLERANCE (inf beyond ``cap``)."""
    low = max(low, MIN_NOISE_MULTIPLIER)
    if high <= low:
        high = 2 * low
    if eps(low) <= epsilon:
        return low
    while eps(high) > epsilon:
        low, high = high, 2 * high
        if low > cap:
            return math.inf
    while high - low > 1e-4 * high and eps(high) < epsilon - EPSILON_TOLERANCE:
        middle = (low + high) / 2
        if eps(middle) <= epsilon:
            high = middle
        else:
            low = middle
    return high


@lru_cache(maxsize=256)
def _noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str, cap: float) -> float:
    # Bisection on the same accountant call the ledger uses, so the calibrated run's epsilon,
    # recomputed, is <= the target (Opacus's get_noise_multiplier stops on another criterion).
    seen: dict[float, float] = {}

    def eps(sigma: float) -> float:
        if sigma not in seen:
            try:
                seen[sigma] = epsilon_spent([(sigma, sample_rate, steps)], delta, accountant)
            except (MemoryError, RuntimeError, ValueError, OverflowError, FloatingPointError):
                # PRV's grid grows without bound (or its discretization check fails) as the noise shrinks:
                # treat such a sigma as too little noise and look higher.
                seen[sigma] = math.inf
        return seen[sigma]

    if accountant == "rdp":
        return _bisect(eps, epsilon, MIN_NOISE_MULTIPLIER, 0.5, cap)
    # PRV and GDP are tighter than RDP, so RDP's answer brackets theirs from above; starting there
    # keeps PRV away from tiny noise multipliers, where its grid needs gigabytes.
    start = min(_noise_multiplier(epsilon, delta, sample_rate, steps, "rdp", cap), cap)
    return _bisect(eps, epsilon, start / 2, start, cap)


def calibrate_noise(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    max_noise_multiplier: float = 50.0,
    *,
    records: int | None = None,
) -> float:
    """The smallest noise multiplier whose epsilon after ``steps`` steps is <= ``epsilon`` (to 0.01 below).

    Raises :class:`PrivacyBudgetError`, with the numbers, when no noise
    multiplier up to ``max_noise_multiplier`` reaches the budget.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError(f"privacy.epsilon must be a positive finite number to calibrate noise, got {epsilon}")
    who = f"a client with {records} records" if records is not None else "a client"
    unreachable = PrivacyBudgetError(
        f"privacy budget unreachable: epsilon {epsilon:g} at delta {delta:.3g} for {who} "
        f"(sample rate {sample_rate:.4g}, {steps} steps over the run) needs a noise multiplier above "
        f"{max_noise_multiplier:g} (privacy.max_noise_multiplier); raise privacy.epsilon, or lower "
        f"federation.rounds / federation.local_epochs, or raise training.batch_size"
    )
    try:
        sigma = _noise_multiplier(
            float(epsilon), float(delta), float(sample_rate), int(steps), accountant, float(max_noise_multiplier)
        )
    except (ValueError, OverflowError, FloatingPointError, RuntimeError):
        raise unreachable from None
    if not math.isfinite(sigma) or sigma > max_noise_multiplier:
        raise unreachable
    return sigma


def plan_clients(
    record_counts: dict[int, int],
    *,
    epsilon: float | None,
    delta: float,
    batch_size: int,
    rounds: int,
    local_epochs: int,
    accountant: str = "prv",
    max_noise_multiplier: float = 50.0,
    known_noise: Mapping[int, float] | None = None,
) -> dict[int, ClientPlan]:
    """Every client's sample rate, worst-case steps and noise multiplier (None when DP is off).

    ``known_noise``: noise multipliers an earlier process of the same run calibrated (a deployment node keeps its
    own between rounds); each is checked against the budget with one accountant call instead of searched again.
    """
    private = epsilon is not None and math.isfinite(epsilon)
    known = dict(known_noise or {})
    plans = {}
    for client, records in sorted(record_counts.items()):
        per_epoch = steps_per_epoch(records, batch_size)
        rate = 1.0 / per_epoch
        steps = rounds * local_epochs * per_epoch
        if private and client in known:
            sigma = float(known[client])
            spent = epsilon_spent([(sigma, rate, steps)], delta, accountant) if sigma > 0 else math.inf
            if not spent <= epsilon:
                raise PrivacyBudgetError(
                    f"client {client}'s known noise multiplier {sigma:g} spends epsilon {spent:.4g} over {steps} steps, "
                    f"more than the budget {epsilon:g}: recalibrate"
                )
        else:
            sigma = (
                calibrate_noise(epsilon, delta, rate, steps, accountant, max_noise_multiplier, records=records)
                if private
                else None
            )
        plans[client] = ClientPlan(records, rate, per_epoch, steps, sigma)
    return plans


__all__ = [
    "ClientPlan",
    "EPSILON_TOLERANCE",
    "PrivacyBudgetError",
    "calibrate_noise",
    "default_delta",
    "epsilon_spent",
    "plan_clients",
    "steps_per_epoch",
]
