"""Secure-aggregation parameters, every bound checked when the config is made.

Arithmetic: each client's plaintext vector is fixed-point in Z_{2^k}. The sum
of n clients must not wrap around, so for every coordinate kind
``n * (bound + 1) <= 2^(k-1) - 1`` where ``bound`` is the largest integer a
client can contribute (``clipping_range * 2^precision_bits`` for the update,
``max_examples`` for the example count). A config that could overflow is
rejected here with that arithmetic in the message.

Threshold: Shamir shares go to a client's group (its neighbours and itself);
any ``threshold`` of them recover a secret. It must exceed half the group, or
a server could claim a client both dropped and survived and collect enough
shares of both of its secrets. The default is a strict majority (Bonawitz et
al.'s honest-but-curious setting); ``threshold_fraction=2/3`` gives their
choice for active security.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from privfer.errors import ConfigError

PROTOCOL_VERSION = 3  # 2: commitments to every dealt share and to b; 3: signed adverts, consistency check, roster-bound shares
MAX_CLIENTS = 65_535


def fits(n: int, bound: float, precision: int, modulus_bits: int) -> bool:
    """Exactly: n * (bound * 2^p + 1) <= 2^(k-1) - 1, so a sum of n encodings never wraps."""
    return n * (Fraction(bound) * Fraction(2) ** precision + 1) <= 2 ** (modulus_bits - 1) - 1


def _auto_precision(n: int, bound: float, modulus_bits: int) -> int:
    """Largest p that cannot overflow, capped so a sum (< 2^53) decodes exactly into a float64."""
    budget = (2 ** (modulus_bits - 1) - 1) / n - 1
    if budget <= 0:
        return -1_000
    precision = min(math.floor(math.log2(budget / bound)), math.floor(math.log2(2.0**53 / (n * bound))))
    while not fits(n, bound, precision, modulus_bits):  # float rounding may overshoot by one
        precision -= 1
    return precision


def assumed_colluders(clients: int, fraction: float) -> int:
    """The colluders a protocol guarantee assumes among ``clients``: floor(fraction x clients), and at least one
    whenever the fraction is positive (10% of nine clients is still one colluder, not none)."""
    count = math.floor(fraction * clients + 1e-9)
    return max(count, 1) if fraction > 0 else count


FAILURE_PROBABILITY = 2.0**-20
"""Target probability that some client's group keeps fewer than t survivors (SecAgg+ degree choice)."""


def group_threshold(group: int, fraction: float, sparse: bool = False) -> int:
    """t = floor(fraction * group) + 1 (> group / 2 for fraction >= 1/2), at most the group.

    On a sparse (Harary) graph of degree k = group - 1, t is at least k/2 + 2:
    a survivor may then have fewer than k/2 dropped neighbours, so no run of
    k/2 consecutive ring positions can be (or be declared) dropped, the
    survivors stay connected, and the server learns only their total — not the
    separate sums of ring segments cut apart by dropouts.
    """
    t = min(group, math.floor(fraction * group + 1e-9) + 1)
    if sparse:
        t = min(group, max(t, (group - 1) // 2 + 2))
    return t


def _binomial_tail(trials: int, p: float, above: int) -> float:
    """P[Binomial(trials, p) > above]."""
    return sum(math.comb(trials, i) * p**i * (1 - p) ** (trials - i) for i in range(above + 1, trials + 1))


@lru_cache(maxsize=1024)
def harary_degree(n: int, expected_dropout: float = 0.1, fraction: float = 0.5,
                  colluding_fraction: float = 0.1) -> int:
    """SecAgg+ default degree (Bell et al. 2020: k = O(log n), growing with dropouts and colluders).

    The smallest even k >= 2 * ceil(log2 n) such that, by a union bound over
    the n clients, both events stay below 2^-20: a client keeps fewer than t of
    its group (each neighbour dropping independently with probability
    ``expected_dropout``), and t of an honest client's neighbours collude
    (each with probability ``colluding_fraction``). n - 1 (the complete graph)
    when no smaller k qualifies.
    """
    k = 2 * math.ceil(math.log2(max(n, 2)))
    while k < n - 1:
        t = group_threshold(k + 1, fraction, sparse=True)
        dropout_risk = n * _binomial_tail(k, expected_dropout, k + 1 - t)  # more than k + 1 - t neighbours drop
        collusion_risk = n * _binomial_tail(k, colluding_fraction, t - 1)  # t or more neighbours collude
        if dropout_risk <= FAILURE_PROBABILITY and collusion_risk <= FAILURE_PROBABILITY:
            return k
        k += 2
    return n - 1


class SecAggConfig(BaseModel):
    """Parameters of pairwise-mask secure aggregation (Bonawitz et al. 2017; SecAgg+ graphs, Bell et al. 2020)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["secagg"] = "secagg"
    num_clients: int = Field(..., ge=2, le=MAX_CLIENTS, description="Clients that start the round (n).")
    modulus_bits: Literal[32, 64] = Field(32, description="Arithmetic in Z_{2^k}.")
    clipping_range: float = Field(8.0, gt=0, le=1e12, description="Update values are clipped to [-c, c] (and counted).")
    precision_bits: int | None = Field(
        None, ge=-64, le=62, description="Fractional bits of the fixed-point code; None: the most that cannot overflow."
    )
    max_examples: int = Field(1 << 20, ge=1, description="Largest example count a client may report.")
    metrics: tuple[str, ...] = Field((), description="Names of per-client metrics summed securely (e.g. loss).")
    metric_range: float = Field(1e3, gt=0, le=1e12, description="Metric values are clipped to [-m, m] (and counted).")
    graph: Literal["complete", "harary"] = Field("complete", description="All pairs, or SecAgg+'s sparse graph.")
    neighbours: int | None = Field(None, ge=1, description="SecAgg+ degree k (even); None: about 2 log2 n.")
    threshold_fraction: float = Field(
        0.5, ge=0.5, lt=1.0, description="t = floor(fraction x group) + 1: 0.5 is a strict majority."
    )
    expected_dropout: float = Field(
        0.1, ge=0.0, lt=0.5, description="Dropout rate the SecAgg+ degree is sized for (when neighbours is None)."
    )
    colluding_fraction: float = Field(
        0.1, ge=0.0, lt=0.5, description="Share of clients that may collude with the server (SecAgg+ degree sizing)."
    )
    threshold: int | None = Field(None, ge=1, description="Explicit Shamir threshold; None: from threshold_fraction.")
    max_vector_length: int = Field(1 << 28, ge=1, le=1 << 31, description="Largest masked vector accepted.")
    encoding: Literal["fixed_point", "integer"] = Field(
        "fixed_point",
        description="Clients submit float arrays (fixed-point encoded here, with example count and metrics) or "
        "already-encoded integer arrays (nothing else is added to the vector).",
    )
    integer_sum_bound: int | None = Field(
        None, ge=1, description="integer encoding: a bound on |sum| of every coordinate, guaranteed by the caller."
    )
    min_inputs: int | None = Field(
        None, ge=2, description="Clients refuse to unmask a round whose survivors (included inputs) are fewer."
    )
    security: Literal["semi_honest", "active"] = Field(
        "semi_honest",
        description="semi_honest: the server is trusted to follow the protocol (Bonawitz et al.'s honest-but-curious "
        "setting). active: every client is an enrolled member whose key advertisement is signed, and no client "
        "reveals a share before at least the consistency threshold of enrolled members signed exactly its view "
        "of the round (survivors, roster, model and plan digest): a server that lies, splits views or invents "
        "clients learns nothing more than the sum (protocols/secagg/SPEC.md, section 6.4).",
    )
    roster: Literal["full", "group"] = Field(
        "full",
        description="What each client receives of the roster and the unmask request: everyone's keys and ids "
        "(O(n) bytes), or everyone's ids as runs of consecutive ids and its group's keys only (O(k + runs) bytes); "
        "either way the client derives the graph itself.",
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> "SecAggConfig":
        n, k = self.num_clients, self.modulus_bits
        limit = 2 ** (k - 1) - 1
        if self.min_inputs is not None and self.min_inputs > n:
            raise ValueError(f"min_inputs {self.min_inputs} is more than the {n} clients of the round")
        if self.security == "active":
            self._check_active()
        if self.encoding == "integer":
            self._check_integer(limit)
            return self._check_graph()
        precision = self.update_precision_bits
        worst = n * (self.clipping_range * 2.0**precision + 1)
        if not fits(n, self.clipping_range, precision, k):
            raise ValueError(
                f"modulus 2^{k} overflows: {n} clients x (clipping_range {self.clipping_range:g} x 2^{precision} + 1) "
                f"= {worst:.4g} > 2^{k - 1} - 1 = {limit}; lower precision_bits, clipping_range or num_clients, "
                f"or use modulus_bits=64"
            )
        if precision < 4:
            raise ValueError(
                f"only {precision} fractional bits fit for {n} clients with clipping_range {self.clipping_range:g} "
                f"in 2^{k}: the sum would be too coarse; use modulus_bits=64 or a smaller clipping_range"
            )
        if n * self.max_examples > limit:
            raise ValueError(
                f"modulus 2^{k} overflows on example counts: {n} clients x max_examples {self.max_examples} "
                f"= {n * self.max_examples} > 2^{k - 1} - 1 = {limit}"
            )
        if self.metrics and self.metric_precision_bits < 0:
            raise ValueError(f"metric_range {self.metric_range:g} leaves no precision for {n} clients in 2^{k}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("metric names must be distinct")
        return self._check_graph()

    def _check_active(self) -> None:
        if self.roster == "group":
            raise ValueError(
                "roster: 'group' cannot be used with security: 'active' yet: a client that sees only its group's "
                "keys cannot count the enrolled members who signed the survivor set, so neither the consistency "
                "check nor min_inputs could be verified with O(log n) work (Bell et al.'s group-level check is not "
                "implemented); use roster: 'full' (O(n) bytes per client) or security: 'semi_honest'")
        if self.sparse:
            raise ValueError(
                f"graph: 'harary' (a sparse SecAgg+ graph of degree {self.degree} for {self.num_clients} clients) "
                "cannot be used with security: 'active': the server chooses the roster and the round id the graph "
                "is drawn from, so it can place colluders in a victim's group, or declare clients beside a colluder "
                "dropped until the ring falls into segments whose sums it unmasks one by one (Bell et al.'s random-"
                "graph argument needs randomness the server does not control); use graph: 'complete' (O(n) masks "
                "and bytes per client) or security: 'semi_honest'")
        colluders = self.colluders
        if self.threshold is not None and self.threshold <= colluders:
            raise ValueError(f"threshold {self.threshold} must exceed the {colluders} colluders of "
                             f"colluding_fraction {self.colluding_fraction:g} x {self.num_clients} clients under "
                             "active security: otherwise the colluders alone rebuild an honest client's secrets")

    @property
    def colluders(self) -> int:
        """The clients of a round that may collude with the server, as the consistency check counts them
        (:func:`assumed_colluders`)."""
        return assumed_colluders(self.num_clients, self.colluding_fraction)

    def study_colluders(self, enrolled: int) -> int:
        """The colluders an active-security client assumes: the round's (:attr:`colluders`) or the study's —
        ``colluding_fraction`` of every member the certificate enrolls — whichever is larger. The server picks a
        round's members, so it could gather every colluding member into one small round: a bound on the round's
        clients alone would not hold."""
        return max(self.colluders, assumed_colluders(enrolled, self.colluding_fraction))

    def consistency_threshold(self, listed: int, colluders: int | None = None) -> int:
        """The fewest survivors an active-security round may list, for a roster of ``listed`` clients; every one of
        them must sign exactly the client's statement before it reveals a share (SPEC section 5.2).

        T = floor((listed + c) / 2) + 1 with c = :attr:`colluders`: two different statements would need 2T
        signatures from ``listed`` members of which only the c colluders sign twice (an honest client signs one
        statement per round), and 2T > listed + c makes that impossible. Every survivor signs, so every input in
        the sum comes from a client that trained from the same model and plan. At least ``min_inputs``: the
        released sum then holds at least min_inputs - c honest inputs. At least 2.
        """
        c = self.colluders if colluders is None else colluders
        return max(2, (listed + c) // 2 + 1, self.min_inputs or 0)

    def _check_integer(self, limit: int) -> None:
        if self.integer_sum_bound is None:
            raise ValueError("integer encoding needs integer_sum_bound (a bound on |sum| of every coordinate)")
        if self.integer_sum_bound > limit:
            raise ValueError(
                f"integer_sum_bound {self.integer_sum_bound} does not fit 2^{self.modulus_bits} "
                f"(at most 2^{self.modulus_bits - 1} - 1 = {limit}); use modulus_bits=64"
            )
        if self.metrics:
            raise ValueError("integer encoding carries no metrics (the vector holds the caller's integers only)")

    def _check_graph(self) -> "SecAggConfig":
        n = self.num_clients
        if self.graph == "harary":
            degree = self.degree
            if degree != n - 1 and (not 2 <= degree < n - 1 or degree % 2):  # n - 1: the complete graph
                raise ValueError(f"neighbours must be even and between 2 and {n - 1} (n - 1), got {degree}")
        group = self.group_size
        t = self.group_threshold
        if not group / 2 < t <= group:
            raise ValueError(
                f"threshold {t} must be more than half of the group of {group} (client plus neighbours) and at most "
                f"{group}: with t <= {group}/2 a server could learn both secrets of one client"
            )
        if self.sparse and t < self.degree // 2 + 2:
            raise ValueError(
                f"threshold {t} on a degree-{self.degree} SecAgg+ graph must be at least k/2 + 2 = "
                f"{self.degree // 2 + 2}: otherwise dropouts can cut the ring and reveal partial sums"
            )
        return self

    @property
    def update_precision_bits(self) -> int:
        if self.precision_bits is not None:
            return self.precision_bits
        return _auto_precision(self.num_clients, self.clipping_range, self.modulus_bits)

    @property
    def metric_precision_bits(self) -> int:
        return min(_auto_precision(self.num_clients, self.metric_range, self.modulus_bits), 40)

    @property
    def degree(self) -> int:
        """Neighbours per client: n - 1 on the complete graph."""
        if self.graph == "complete":
            return self.num_clients - 1
        if self.neighbours is not None:
            return self.neighbours
        return harary_degree(self.num_clients, self.expected_dropout, self.threshold_fraction,
                             self.colluding_fraction)

    @property
    def group_size(self) -> int:
        """Holders of a client's shares: its neighbours and itself."""
        return self.degree + 1

    @property
    def sparse(self) -> bool:
        """True when the SecAgg+ graph is not simply the complete graph."""
        return self.graph == "harary" and self.degree < self.num_clients - 1

    @property
    def group_threshold(self) -> int:
        if self.threshold is not None:
            return self.threshold
        return group_threshold(self.group_size, self.threshold_fraction, self.sparse)


def make_config(**settings: object) -> SecAggConfig:
    """Build a :class:`SecAggConfig`, turning validation failures into :class:`ConfigError` with the field named."""
    from pydantic import ValidationError

    try:
        return SecAggConfig(**settings)
    except ValidationError as exc:
        parts = []
        for item in exc.errors():
            field = ".".join(str(p) for p in item["loc"]) or "secagg"
            parts.append(f"{field}: {item['msg'].removeprefix('Value error, ')}")
        raise ConfigError("invalid secure-aggregation config: " + "; ".join(parts)) from None
