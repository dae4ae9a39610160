"""Record-level distributed DP-SGD: each client's integer contribution and noise share, calibrated for the run.

One secure-aggregation round is one DP-SGD step over the union of the
round's clients' records. Client ``c`` sums its (Poisson-sampled, rate q)
records' per-example gradients clipped to norm C, scales the sum by
``scale`` (integer units per unit of gradient), rounds every coordinate
randomly (up with probability equal to its fractional part) and adds an
integer noise share of variance ``share_variance`` from the plan's noise
family (:mod:`privfer.privacy.noise`: Skellam by default). The server learns
only the sum over the included clients, which carries the noise of at least
``min_inputs - colluders`` honest shares, of variance at least ``mu``, the
calibrated variance.

Sensitivity of the rounded release (proved in protocols/secagg/SPEC.md,
"Distributed DP"): couple the two neighbouring runs on the same rounding
uniforms U. Rounding is ``floor(y + U)``, so one record's clipped gradient
``g`` (||g|| <= C) changes the client's rounded sum by an integer vector ``v``
with ``|v_j - scale g_j| < 1`` in every coordinate, hence

    ||v||_2 <= C scale + sqrt(d) = l2,      ||v||_1 <= min(sqrt(d) l2, l2^2) = l1

(an integer vector has |v_j| <= v_j^2). For every fixed U the release is the
noise family's mechanism with these sensitivities, and Rényi divergence is jointly
quasi-convex, so the bound holds for the randomly rounded release. The
same argument holds for every noise family: its accountant is given these
sensitivities.
``scale`` is a power of two chosen so that sqrt(d) / (C scale) is at most
``privacy.rounding_overhead`` (1% by default): the rounding's cost is counted,
and small.

Trust sizing: shares have variance ``mu / m_honest`` with
``m_honest = min_inputs - colluders``; clients refuse to unmask a round with
fewer than ``min_inputs`` included inputs, and at most ``colluders`` of them
can remove their own shares, so every released sum carries at least ``mu``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from privfer.errors import ConfigError
from privfer.privacy.calibrate import EPSILON_TOLERANCE, PrivacyBudgetError
from privfer.privacy.mechanisms import select
from privfer.privacy.noise import DEFAULT, NoiseFamily, NoiseSteps, noise_family
from privfer.privacy.rdp import MAX_STEPS
from privfer.secagg.config import assumed_colluders

if TYPE_CHECKING:
    from privfer.config import PrivferConfig

MIN_NOISE_MULTIPLIER = 1e-3
NOISELESS = "none"  # the noise field of a run without DP's plan (:func:`noiseless_plan`): no family, no account


def min_inputs(clients: int, fraction: float) -> int:
    """The fewest included inputs a round may release: ceil(fraction x clients), at least 2."""
    return max(2, math.ceil(fraction * clients - 1e-9))


def colluders(clients: int, fraction: float) -> int:
    """The colluders a round's noise shares are sized for: floor(fraction x clients), and at least one whenever the
    fraction is positive (secure aggregation's own assumption, :func:`privfer.secagg.config.assumed_colluders`: 10%
    of nine clients is still one colluder, not none)."""
    return assumed_colluders(clients, fraction)


def rounding_scale(max_grad_norm: float, dimension: int, overhead: float) -> float:
    """The smallest power of two with sqrt(d) / (C scale) <= overhead."""
    if not (max_grad_norm > 0 and dimension >= 1 and overhead > 0):
        raise ValueError("max_grad_norm, dimension and overhead must be positive")
    return 2.0 ** math.ceil(math.log2(math.sqrt(dimension) / (max_grad_norm * overhead)))


def sensitivities(max_grad_norm: float, scale: float, dimension: int) -> tuple[float, float]:
    """(l1, l2) of one record's randomly rounded contribution in integer units (module docstring)."""
    l2 = max_grad_norm * scale + math.sqrt(dimension)
    return min(math.sqrt(dimension) * l2, l2 * l2), l2


@dataclass(frozen=True)
class DistributedPlan:
    """Everything one phase of distributed DP-SGD needs, fixed before it starts (and written to the ledger)."""

    max_grad_norm: float
    dimension: int  # coordinates each client submits
    scale: float  # integer units per unit of gradient
    l1: float
    l2: float
    mu: float  # least total noise variance of any released sum (integer units)
    share_variance: float  # each client's share: mu / m_honest
    sample_rate: float
    steps: int  # worst case: a client in every round
    clients: int  # per round
    min_inputs: int
    colluders: int
    delta: float
    target_epsilon: float
    modulus_bits: int
    sum_bound: int  # |any coordinate of a released sum| stays below this (with failure TAIL_FAILURE)
    records: int  # records of the round's clients together (the public denominator is q x this)
    noise: str  # the noise family (privfer.privacy.noise)

    @property
    def family(self) -> NoiseFamily:
        return noise_family(self.noise)

    @property
    def noise_multiplier(self) -> float:
        """Standard deviation of the sum's noise in units of C (the Gaussian with the same variance)."""
        return math.sqrt(self.mu) / self.l2

    @property
    def honest(self) -> int:
        return self.min_inputs - self.colluders

    def steps_entry(self, steps: int) -> NoiseSteps:
        """``steps`` releases of this plan's sum (its noise carried by at least the honest shares)."""
        return self.family.steps(self.mu, self.l1, self.l2, self.sample_rate, int(steps), self.honest, self.dimension)

    def epsilon(self, steps: int | None = None) -> float:
        return self.family.epsilon([self.steps_entry(self.steps if steps is None else steps)], self.delta)[0]

    def to_dict(self) -> dict:
        return {**asdict(self), "noise_multiplier": self.noise_multiplier}


def calibrate_distributed(
    *,
    epsilon: float,
    delta: float,
    max_grad_norm: float,
    dimension: int,
    sample_rate: float,
    steps: int,
    clients: int,
    records: int,
    min_inputs_fraction: float,
    colluding_fraction: float,
    rounding_overhead: float,
    modulus_bits: int,
    max_noise_multiplier: float,
    min_colluders: int = 0,
    noise: str = DEFAULT,
) -> DistributedPlan:
    """The least noise variance mu (of the family ``noise``) whose epsilon after ``steps`` rounds is <= ``epsilon`` (to 0.01 below).

    The shares are sized for ``max(floor(colluding_fraction x clients), min_colluders)`` colluders.

    Raises :class:`PrivacyBudgetError` when the budget needs more noise than
    ``max_noise_multiplier`` (x C) and :class:`ConfigError` when the trust or
    modulus settings cannot work. The search is a fixed number of bisection
    steps, whatever the budget.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError(f"privacy.epsilon must be a positive finite number to calibrate noise, got {epsilon}")
    if not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"federation.rounds = {steps}: distributed DP-SGD allows 1 to {MAX_STEPS} steps")
    minimum = min_inputs(clients, min_inputs_fraction)
    colluding = max(colluders(clients, colluding_fraction), min_colluders)
    honest = minimum - colluding
    if honest < 1:
        population = (" (the colluders of the clients the round is drawn from: the server picks the rounds and may "
                      "gather them in one)" if colluding > colluders(clients, colluding_fraction) else "")
        raise ConfigError(
            f"aggregation.min_inputs_fraction: {minimum} minimum inputs minus {colluding} colluders{population} leaves "
            f"no honest client to carry the noise in a round of {clients}; raise federation.clients_per_round or "
            f"min_inputs_fraction, or lower aggregation.colluding_fraction"
        )
    family = noise_family(noise)
    scale = rounding_scale(max_grad_norm, dimension, rounding_overhead)
    l1, l2 = sensitivities(max_grad_norm, scale, dimension)

    def spent(z: float) -> float:
        return family.epsilon([family.steps((z * l2) ** 2, l1, l2, sample_rate, steps, honest, dimension)], delta)[0]

    high = max_noise_multiplier
    if spent(high) > epsilon:
        raise PrivacyBudgetError(
            f"privacy budget unreachable: epsilon {epsilon:g} at delta {delta:.3g} over {steps} distributed DP-SGD "
            f"steps with {family.title} noise (sample rate {sample_rate:g}) needs a noise multiplier above {max_noise_multiplier:g} "
            f"(privacy.max_noise_multiplier); raise privacy.epsilon or lower federation.rounds"
        )
    low = max(MIN_NOISE_MULTIPLIER, math.sqrt(family.min_mu(honest)) / l2 * (1 + 1e-9))  # where the bound holds
    if spent(low) <= epsilon:
        high = low
    else:
        for _ in range(64):  # geometric bisection: the number of steps does not depend on the budget
            middle = math.sqrt(low * high)
            if spent(middle) <= epsilon:
                high = middle
            else:
                low = middle
            if high / low < 1 + 1e-6 or spent(high) >= epsilon - EPSILON_TOLERANCE:
                break
    mu = (high * l2) ** 2
    share = mu / honest
    # the noise of all the round's shares stays below the tail bound (union bound over coordinates and steps)
    bound = _sum_bound(records, max_grad_norm, scale, clients, modulus_bits,
                       family.tail_bound(clients * share, float(dimension) * steps))
    return DistributedPlan(
        max_grad_norm=float(max_grad_norm), dimension=int(dimension), scale=scale, l1=l1, l2=l2, mu=mu,
        share_variance=share, sample_rate=float(sample_rate), steps=int(steps), clients=int(clients),
        min_inputs=minimum, colluders=colluding, delta=float(delta), target_epsilon=float(epsilon),
        modulus_bits=int(modulus_bits), sum_bound=bound, records=int(records), noise=family.name,
    )


def _sum_bound(records: int, max_grad_norm: float, scale: float, clients: int, modulus_bits: int,
               noise_tail: float) -> int:
    """The bound on any coordinate of a released sum: every record's clipped gradient moves a coordinate by at most
    C, rounding by < 1 per client, and the noise by at most ``noise_tail``; ConfigError beyond the modulus."""
    bits = int(modulus_bits)
    limit = 2 ** (bits - 1) - 1
    needed = records * max_grad_norm * scale + clients + noise_tail
    if needed > limit:
        raise ConfigError(
            f"aggregation.modulus_bits = {bits}: a sum of {records} records' gradients at scale 2^"
            f"{int(math.log2(scale))} with noise can reach {needed:.3g}, beyond 2^{bits - 1} - 1; use "
            f"aggregation.modulus_bits: 64 or raise privacy.rounding_overhead"
        )
    return min(limit, math.ceil(needed))


def noiseless_plan(config: PrivferConfig, *, delta: float, dimension: int, steps: int, clients: int,
                   records: int, population: int | None = None) -> DistributedPlan:
    """The plan of a run without DP on the distributed line (its ``config.algorithm``): the same clipping, sampling,
    integer encoding and secure sum as its private runs, with no noise — the ceiling of their accuracy
    (``population`` is :func:`calibrate_plan`'s, unused: there are no noise shares for colluders to remove). Its
    ``noise`` is :data:`NOISELESS`, which names no family, so nothing can account it as private (``family``
    raises) and no share is drawn for it (:func:`encode_contribution`)."""
    privacy, aggregation = config.privacy, config.aggregation
    if config.privacy.enabled:
        raise ValueError("a private run has no noiseless plan: calibrate its noise (calibrate_plan)")
    mechanism = select(config.algorithm, privacy.unit)
    if mechanism is None or not mechanism.noise_in_sum:
        raise ValueError(f"a run without DP trained by {config.algorithm!r} sums no integer contributions")
    unit = mechanism.plan_inputs(
        max_grad_norm=privacy.max_grad_norm, sample_rate=privacy.sample_rate, max_update_norm=privacy.max_update_norm,
        participation=privacy.participation, clients=clients, records=records)
    scale = rounding_scale(unit.max_grad_norm, dimension, privacy.rounding_overhead)
    l1, l2 = sensitivities(unit.max_grad_norm, scale, dimension)
    return DistributedPlan(
        max_grad_norm=float(unit.max_grad_norm), dimension=int(dimension), scale=scale, l1=l1, l2=l2, mu=0.0,
        share_variance=0.0, sample_rate=float(unit.sample_rate), steps=int(steps), clients=int(clients),
        min_inputs=min_inputs(clients, aggregation.min_inputs_fraction), colluders=0, delta=float(delta),
        target_epsilon=math.inf, modulus_bits=int(aggregation.modulus_bits),
        sum_bound=_sum_bound(unit.records, unit.max_grad_norm, scale, clients, aggregation.modulus_bits, 0.0),
        records=int(unit.records), noise=NOISELESS,
    )


def calibrate_plan(config: PrivferConfig, *, delta: float, dimension: int, steps: int, clients: int,
                   records: int, population: int | None = None) -> DistributedPlan:
    """A distributed phase's plan from the run's config: the unit picks the clipping bound (a record's gradient
    or a person's update) and the sample rate (Poisson records or the secret coin). The simulation and
    ``privfer audit``'s cross-check both calibrate through here: the one translation of a run's config into a plan.

    ``population``: the clients the server may choose a round's ``clients`` from. It picks the rounds, so it could
    gather every colluder of the population into one round: the shares are sized for the colluders of the
    population, not of the round (:meth:`privfer.secagg.config.SecAggConfig.study_colluders`' reasoning)."""
    privacy, aggregation = config.privacy, config.aggregation
    mechanism = select(config.mechanism, privacy.unit)
    if mechanism is None or not mechanism.noise_in_sum:
        raise ValueError(f"the run's mechanism ({config.mechanism_id}) puts no noise in the secure sum: it has no "
                         "distributed plan")
    unit = mechanism.plan_inputs(
        max_grad_norm=privacy.max_grad_norm, sample_rate=privacy.sample_rate, max_update_norm=privacy.max_update_norm,
        participation=privacy.participation, clients=clients, records=records)
    return calibrate_distributed(
        epsilon=privacy.epsilon, delta=delta, max_grad_norm=unit.max_grad_norm, dimension=dimension,
        sample_rate=unit.sample_rate, steps=steps, clients=clients, records=unit.records,
        min_inputs_fraction=aggregation.min_inputs_fraction,
        colluding_fraction=aggregation.colluding_fraction, rounding_overhead=privacy.rounding_overhead,
        modulus_bits=aggregation.modulus_bits, max_noise_multiplier=privacy.max_noise_multiplier, noise=privacy.noise,
        min_colluders=colluders(max(population or clients, clients), aggregation.colluding_fraction),
    )


def noise_generator(key: bytes | None = None) -> np.random.Generator:
    """A numpy Generator over ChaCha20 keyed by ``key`` (32 bytes), or by 32 bytes of the OS CSPRNG.

    ChaCha20 is a stream cipher: without the key its output is unpredictable,
    so the noise shares and rounding uniforms cannot be recomputed by the
    server (which never holds the key).
    """
    from randomgen import ChaCha

    key = os.urandom(32) if key is None else key
    if len(key) != 32:
        raise ValueError("a noise key is 32 bytes")
    return np.random.Generator(ChaCha(key=int.from_bytes(key, "little"), rounds=20))


def derived_key(secret: bytes, *labels: object) -> bytes:
    """A 32-byte key for one client and round from a run's secret key (HMAC-SHA256)."""
    message = "privfer/distributed-noise/" + "/".join(str(label) for label in labels)
    return hmac.new(secret, message.encode(), hashlib.sha256).digest()


def randomized_round(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """floor(x + U), U uniform in [0, 1): unbiased, each value moved by less than 1."""
    low = np.floor(values)
    return (low + (rng.random(values.shape) < (values - low))).astype(np.int64)


def _noise(plan: DistributedPlan, rng: np.random.Generator, variance: float, size: int) -> np.ndarray | int:
    """``size`` values of the plan's noise at ``variance``; none for a run without DP's plan (:data:`NOISELESS`)."""
    return 0 if plan.noise == NOISELESS else plan.family.sample(rng, variance, size)


def encode_contribution(clipped_sum: np.ndarray, plan: DistributedPlan, rng: np.random.Generator) -> np.ndarray:
    """A client's integer contribution: round(scale x its clipped gradient sum) + its noise share."""
    flat = np.asarray(clipped_sum, dtype=np.float64).ravel()
    if flat.size > plan.dimension:
        raise ValueError(f"the contribution has {flat.size} coordinates, more than the plan's {plan.dimension}")
    if not np.all(np.isfinite(flat)):
        raise ValueError("clipped gradient sums must be finite")
    return randomized_round(flat * plan.scale, rng) + _noise(plan, rng, plan.share_variance, flat.size)


def local_noisy_sum(clipped_sum: np.ndarray, plan: DistributedPlan, rng: np.random.Generator) -> np.ndarray:
    """A clipped sum with the FULL noise (variance mu), decoded to gradient units: for parameters that never
    leave the client (FedPer's personal layers), noised as if released alone."""
    flat = np.asarray(clipped_sum, dtype=np.float64).ravel()
    noisy = randomized_round(flat * plan.scale, rng) + _noise(plan, rng, plan.mu, flat.size)
    return np.asarray(noisy, dtype=np.float64) / plan.scale


def decode_sum(total: np.ndarray, plan: DistributedPlan) -> np.ndarray:
    """The released integer sum -> a float gradient sum (divide by the public expected batch afterwards)."""
    total = np.asarray(total, dtype=np.int64)
    if total.size and int(np.abs(total).max()) > plan.sum_bound:
        raise ValueError(
            f"a released sum coordinate exceeds the planned bound {plan.sum_bound}: the modulus wrapped or a "
            "contribution broke the plan"
        )
    return total.astype(np.float64) / plan.scale


__all__ = [
    "DistributedPlan",
    "calibrate_distributed",
    "calibrate_plan",
    "colluders",
    "decode_sum",
    "derived_key",
    "encode_contribution",
    "local_noisy_sum",
    "min_inputs",
    "noise_generator",
    "noiseless_plan",
    "randomized_round",
    "rounding_scale",
    "sensitivities",
]
