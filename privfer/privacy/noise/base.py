"""What a noise family of distributed DP is: the integer noise each client adds to the secure sum, and its accountant.

A family (one file under :mod:`privfer.privacy.noise`, registered there) says:

* how a client draws its integer noise share of a given variance
  (:meth:`NoiseFamily.sample`) from its secret ChaCha20 generator;
* the RDP of ONE unsampled release of a sum carrying the noise of ``shares``
  independent shares of total variance ``mu``, for an integer vector whose
  L1 / L2 sensitivities are ``l1`` / ``l2`` (:meth:`NoiseFamily.base_rdp`),
  and a second implementation of it written loop by loop for the audit
  (:meth:`NoiseFamily.independent_base_rdp`, sharing no code with the first);
* how far the noise of a sum can reach (:meth:`NoiseFamily.tail_bound`), which
  sizes the modulus;
* what the ledger says about it: the accountant's id and its citation.

Everything else — Poisson subsampling, composition over steps and the
conversion to (epsilon, delta) — is the same for every family
(:mod:`privfer.privacy.rdp`), and so are calibration, rounding and the
contribution's encoding (:mod:`privfer.privacy.distributed`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np

from privfer.privacy.rdp import MAX_STEPS, ORDERS, rdp_to_epsilon, subsampled_rdp

INTEGER_FIELDS = ("steps", "shares", "dimension")
TAIL_FAILURE = 2.0**-40  # chance, over a whole run, that a sum coordinate leaves the modulus' headroom
MAX_SHARES = 1_000_000  # shares a history entry may claim (a ledger asking for more is refused)
MAX_DIMENSION = 10**12


@dataclass(frozen=True)
class NoiseSteps:
    """``steps`` releases of a sum of ``dimension`` coordinates carrying noise of total variance >= ``mu`` (integer
    units) made of at least ``shares`` independent shares, each record in the sum with probability ``sample_rate``,
    one record moving the sum by at most ``l1`` / ``l2``. ``shares`` and ``dimension`` matter only to families
    whose bound depends on them (1 elsewhere, see :meth:`NoiseFamily.steps`)."""

    mu: float
    l1: float
    l2: float
    sample_rate: float
    steps: int
    shares: int = 1
    dimension: int = 1

    def __post_init__(self) -> None:
        for name in ("mu", "l1", "l2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if isinstance(self.steps, bool) or not (isinstance(self.steps, int) and 0 <= self.steps <= MAX_STEPS):
            raise ValueError(f"steps must be an integer in 0..{MAX_STEPS}, got {self.steps!r}")
        if isinstance(self.shares, bool) or not (isinstance(self.shares, int) and 1 <= self.shares <= MAX_SHARES):
            raise ValueError(f"shares must be an integer in 1..{MAX_SHARES}, got {self.shares!r}")
        if isinstance(self.dimension, bool) or not (isinstance(self.dimension, int)
                                                    and 1 <= self.dimension <= MAX_DIMENSION):
            raise ValueError(f"dimension must be an integer in 1..{MAX_DIMENSION}, got {self.dimension!r}")

    @property
    def key(self) -> tuple[float, float, float, float, int, int]:
        """The mechanism of one step, without its count."""
        return (self.mu, self.l1, self.l2, self.sample_rate, self.shares, self.dimension)


class NoiseFamily(ABC):
    """One kind of integer noise summed inside secure aggregation (see the module docstring)."""

    name: ClassVar[str]  # the config value (privacy.noise) and the ledger's 'noise' field
    title: ClassVar[str]  # in sentences: "Skellam"
    accountant: ClassVar[str]  # the ledger's accountant id
    accounting: ClassVar[str]  # the ledger's statement of the bound, with citations
    # the fields of a ledger history entry, in order (a subset of NoiseSteps' fields; 'steps' is always there)
    fields: ClassVar[tuple[str, ...]] = ("mu", "l1", "l2", "sample_rate", "steps")

    @abstractmethod
    def sample(self, rng: np.random.Generator, variance: float, size: int) -> np.ndarray:
        """``size`` independent integer noise values (int64) of variance ``variance``, from ``rng``."""

    @abstractmethod
    def base_rdp(self, orders: np.ndarray, l1: float, l2: float, mu: float, shares: int,
                 dimension: int) -> np.ndarray:
        """RDP at ``orders`` of one unsampled release (sensitivities and variance in integer units)."""

    @abstractmethod
    def independent_base_rdp(self, alpha: int, l1: float, l2: float, mu: float, shares: int,
                             dimension: int) -> float:
        """The same as :meth:`base_rdp` at one order, written again without numpy or shared code (the audit's
        second implementation)."""

    @abstractmethod
    def tail_bound(self, variance: float, coordinates: float, failure: float = TAIL_FAILURE) -> float:
        """t with P(some |noise of variance ``variance``| > t among ``coordinates`` draws) <= ``failure``."""

    def min_mu(self, shares: int) -> float:
        """The least total variance of ``shares`` shares the bound holds for (0: any positive variance)."""
        return 0.0

    def check_shares(self, mu: float, shares: int) -> None:
        """ValueError when ``shares`` shares of total variance ``mu`` are outside the bound's assumptions."""
        if mu < self.min_mu(shares):
            raise ValueError(f"{shares} {self.title} shares need a total variance of at least "
                             f"{self.min_mu(shares):g}, got {mu:g}")

    # --- composition (the same for every family) ---

    def step_rdp(self, step: NoiseSteps) -> np.ndarray:
        """One step's RDP at :data:`ORDERS`, Poisson-subsampled at the step's rate."""
        return np.array(_step_rdp(self, *step.key))

    def history_rdp(self, history: list[NoiseSteps] | tuple[NoiseSteps, ...]) -> np.ndarray:
        """The composed RDP at :data:`ORDERS` of every entry of ``history``."""
        total = np.zeros(len(ORDERS))
        for entry in history:
            if entry.steps:
                total += entry.steps * self.step_rdp(entry)
        return total

    def epsilon(self, history: list[NoiseSteps] | tuple[NoiseSteps, ...], delta: float,
                extra_rdp: np.ndarray | list[float] | None = None) -> tuple[float, int]:
        """(epsilon, order) after every entry of ``history``, composed (with ``extra_rdp`` at :data:`ORDERS`, an
        already composed part, added)."""
        total = self.history_rdp(history)
        if extra_rdp is not None:
            total = total + np.asarray(extra_rdp, dtype=np.float64)
        if not np.any(total):
            return 0.0, int(ORDERS[0])
        return rdp_to_epsilon(ORDERS, total, delta)

    # --- the ledger's history entries ---

    def steps(self, mu: float, l1: float, l2: float, sample_rate: float, steps: int, shares: int,
              dimension: int) -> NoiseSteps:
        """NoiseSteps of this family: ``shares`` and ``dimension`` are kept only where the bound depends on them
        (in :attr:`fields`), so that two entries of the same mechanism compare equal."""
        return NoiseSteps(mu, l1, l2, sample_rate, int(steps), int(shares) if "shares" in self.fields else 1,
                          int(dimension) if "dimension" in self.fields else 1)

    def entry_key(self, step: NoiseSteps) -> tuple:
        """A history entry's fields other than its steps: entries with the same key merge by adding steps."""
        return tuple(value for name, value in zip(self.fields, self.entry(step)) if name != "steps")

    def entry(self, step: NoiseSteps) -> list[float]:
        """``step`` as a ledger history entry (:attr:`fields`, in order)."""
        return [int(step.steps) if name == "steps" else getattr(step, name) for name in self.fields]

    def parse_entry(self, item: object) -> NoiseSteps:
        """A ledger history entry back as NoiseSteps; ValueError naming the expected fields when it is not one."""
        if not (isinstance(item, list) and len(item) == len(self.fields)
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in item)):
            raise ValueError(f"a {self.title} history entry is [{', '.join(self.fields)}]")
        values = dict(zip(self.fields, item))
        for name in INTEGER_FIELDS:
            if name in values:
                if not float(values[name]).is_integer():
                    raise ValueError(f"a {self.title} history entry's {name} is a whole number")
                values[name] = int(values[name])
        step = NoiseSteps(**{k: (v if k in INTEGER_FIELDS else float(v)) for k, v in values.items()})
        self.check_shares(step.mu, step.shares)
        return step


@lru_cache(maxsize=4096)
def _step_rdp(family: NoiseFamily, mu: float, l1: float, l2: float, sample_rate: float, shares: int,
              dimension: int) -> tuple[float, ...]:
    base = family.base_rdp(np.array(ORDERS), l1, l2, mu, shares, dimension)
    return tuple(subsampled_rdp(ORDERS, sample_rate, base))


__all__ = ["MAX_SHARES", "NoiseFamily", "NoiseSteps", "TAIL_FAILURE"]
