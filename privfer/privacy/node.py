"""Distributed DP across nodes of any FL framework (person or record level): the server's plan, each node's own
policy, plan acceptance and lifetime ledger. Framework-neutral and torch-free: the Flower integration
(:mod:`privfer.integrations.flower`) carries these across Flower messages; another framework can too.

The server (:class:`DistributedDP`; in Flower, ``SecAggGrid(dp=...)``) calibrates
one plan per protected round for the nodes it sampled and sends it with the
first stage. Nothing about the noise is left to the server, though:

* each node checks the plan against its own policy (:class:`NodePrivacy`):
  the sensitivities follow from the clipping bound, scale and dimension; the
  round's minimum of included inputs and the colluders it is sized for are at
  least what the node assumes; the honest shares carry the claimed variance;
  the secure-aggregation config enforces the plan's minimum inputs;
* it draws its own secret coin and noise share (ChaCha20 keyed by the OS
  CSPRNG), clips its own update (the ``ClientApp``'s trained arrays minus the
  received ones) to the plan's bound, and sends only the integer
  contribution (:func:`privfer.privacy.person.person_contribution`);
* it keeps its privacy ledger on its own disk (:class:`~privfer.privacy.node_ledger.NodeLedger`): the
  history of every round it contributed to (one noise family per ledger), across runs and
  restarts, against a lifetime budget. A round that would take it past the
  budget is refused before the ``ClientApp`` trains; the round's spend is
  written (atomically) before its masked input leaves the node.

Accounting: the node's epsilon is its noise family's RDP of its history at its
own delta (:meth:`privfer.privacy.noise.NoiseFamily.epsilon`), each round one step
of the plan's mechanism with the secret coin as the Poisson sample rate, the
same bound ``privfer audit`` recomputes for ``privfer simulate``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from privfer.config import MAX_EPSILON
from privfer.errors import ConfigError
from privfer.privacy.distributed import DistributedPlan, calibrate_distributed, colluders, min_inputs, sensitivities
from privfer.privacy.mechanisms import select, units_of
from privfer.privacy.noise import DEFAULT, FAMILIES
from privfer.privacy.rdp import MAX_STEPS
from privfer.secagg.config import SecAggConfig
from privfer.secagg.errors import SecAggError

DISTRIBUTED = "distributed"  # the privacy.mechanism whose plans nodes accept: the noise is in the secure sum
UNITS = {unit: select(DISTRIBUTED, unit) for unit in units_of(DISTRIBUTED)}  # unit -> its registered mechanism


def _check_noise(value: Any) -> None:
    if value not in FAMILIES:
        raise ConfigError(f"noise must be one of {sorted(FAMILIES)}, got {value!r}")


def _check_min_colluders(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000:
        raise ConfigError(f"min_colluders must be an integer in 0..1000000, got {value!r}")


class NodePrivacyError(SecAggError):
    """A node refuses a round for a privacy reason: an unacceptable plan, an exhausted budget, a bad ledger."""


class UnacceptablePlan(NodePrivacyError):
    """The server's DP plan contradicts itself or the node's policy."""


class BudgetExhausted(NodePrivacyError):
    """Another round would take the node past its lifetime budget."""


class NodeLedgerError(NodePrivacyError):
    """The node's ledger file is unreadable, corrupt or belongs to another policy; the node refuses to train."""


@dataclass(frozen=True)
class NodePrivacy:
    """What a node promises its person, whatever a run asks: a lifetime budget kept on its own disk.

    ``ledger``: the node's ledger file (created on first use). ``lifetime_epsilon`` at ``delta``: the most this
    node ever spends, over every run. ``colluding_fraction`` / ``min_inputs_fraction``: the node's own trust
    assumptions; a plan sized for fewer colluders or fewer minimum inputs is refused. ``min_colluders``: an
    absolute floor on the colluders a plan is sized for, whatever the round's size — a server that inflates a
    round with sybil nodes it controls raises the fraction's count with it, so a node that believes the server
    can field up to m sybils sets ``min_colluders = m`` and refuses plans whose honest shares would not carry the
    noise without them.
    """

    ledger: Path
    lifetime_epsilon: float
    delta: float
    colluding_fraction: float = 0.1
    min_inputs_fraction: float = 0.9
    unit: str = "person"  # or "record": the unit this node's ledger and accepted plans protect
    min_colluders: int = 0
    noise: str = DEFAULT  # the noise family of the plans this node accepts (one per ledger)

    def __post_init__(self) -> None:
        _check_noise(self.noise)
        ledger = Path(self.ledger)
        if not ledger.is_absolute():
            raise ConfigError(f"the ledger path must be absolute (a node's ledger must not move with its working "
                             f"directory), got {str(ledger)!r}")
        object.__setattr__(self, "ledger", ledger)
        if self.unit not in UNITS:
            raise ConfigError(f"unit must be one of {sorted(UNITS)}, got {self.unit!r}")
        for name in ("lifetime_epsilon", "delta"):  # numbers, never booleans (True would pass 0 < True <= ...)
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        if not (0 < self.lifetime_epsilon <= MAX_EPSILON):
            raise ConfigError(f"lifetime_epsilon must be in (0, {MAX_EPSILON:g}], got {self.lifetime_epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if not 0 <= self.colluding_fraction < 0.5:
            raise ConfigError(f"colluding_fraction must be in [0, 0.5), got {self.colluding_fraction}")
        if not 0 < self.min_inputs_fraction <= 1:
            raise ConfigError(f"min_inputs_fraction must be in (0, 1], got {self.min_inputs_fraction}")
        _check_min_colluders(self.min_colluders)

    def colluders(self, clients: int) -> int:
        """The colluders this node assumes in a round of ``clients``: its fraction's count, at least its floor."""
        return max(colluders(clients, self.colluding_fraction), self.min_colluders)


@dataclass(frozen=True)
class DistributedDP:
    """The server's side: person-level distributed DP for every protected ``train`` round (``SecAggGrid(dp=...)``).

    ``epsilon`` at ``delta`` over ``rounds`` rounds is the run's target for a node in every round; each node still
    holds itself to its own lifetime budget. ``max_update_norm``: each node's update is clipped to this L2 norm;
    ``participation``: each node's secret coin (heads: its update, tails: zeros).
    """

    epsilon: float
    rounds: int
    delta: float
    unit: str = "person"
    max_update_norm: float = 0.5  # person: each node's whole update is clipped to this
    participation: float = 1.0  # person: each node's secret coin
    max_grad_norm: float = 1.0  # record: each example's gradient is clipped to this (by the ClientApp)
    sample_rate: float = 1.0  # record: each record's Poisson rate (the ClientApp samples)
    max_records: int = 1_000_000  # record: a bound on one round's records together (the sum's headroom)
    # record: the reply to the strategy is the received arrays minus server_lr x the noisy mean gradient, with no
    # optimizer state: the strategy's own server optimizer is the only one (FedAvg: SGD at server_lr; FedAdam,
    # FedYogi: their adaptive step on the pseudo-gradient server_lr x g, whose scale their own lr sets)
    server_lr: float = 1.0
    colluding_fraction: float = 0.1
    min_inputs_fraction: float = 0.9
    min_colluders: int = 0  # an absolute floor on the colluders the shares are sized for (NodePrivacy's)
    rounding_overhead: float = 0.01
    modulus_bits: int = 64
    max_noise_multiplier: float = 50.0
    noise: str = DEFAULT  # the noise family of the shares (privfer.privacy.noise)

    def __post_init__(self) -> None:
        _check_noise(self.noise)
        if not 0 < self.epsilon <= MAX_EPSILON:  # (NaN fails too)
            raise ConfigError(f"epsilon must be in (0, {MAX_EPSILON:g}], got {self.epsilon!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or not 1 <= self.rounds <= MAX_STEPS:
            raise ConfigError(f"rounds must be a whole number in 1..{MAX_STEPS}, got {self.rounds!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.unit not in UNITS:
            raise ConfigError(f"unit must be one of {sorted(UNITS)}, got {self.unit!r}")
        if not (self.max_update_norm > 0 and 0 < self.participation <= 1 and self.max_grad_norm > 0
                and 0 < self.sample_rate <= 1 and self.max_records >= 1 and self.server_lr > 0):
            raise ConfigError("clipping bounds, max_records and server_lr must be positive; participation and "
                             "sample_rate in (0, 1]")
        _check_min_colluders(self.min_colluders)

    @property
    def mechanism_id(self) -> str:
        return UNITS[self.unit].id

    def plan(self, clients: int, dimension: int) -> DistributedPlan:
        """The plan of a round of ``clients`` nodes sending ``dimension`` noised coordinates (ConfigError, or
        PrivacyBudgetError when the budget needs more noise than ``max_noise_multiplier``)."""
        unit = UNITS[self.unit].plan_inputs(max_grad_norm=self.max_grad_norm, sample_rate=self.sample_rate,
                                            max_update_norm=self.max_update_norm, participation=self.participation,
                                            clients=clients, records=self.max_records)
        return calibrate_distributed(
            epsilon=self.epsilon, delta=self.delta, max_grad_norm=unit.max_grad_norm, dimension=dimension,
            sample_rate=unit.sample_rate, steps=self.rounds, clients=clients, records=unit.records,
            min_inputs_fraction=self.min_inputs_fraction, colluding_fraction=self.colluding_fraction,
            rounding_overhead=self.rounding_overhead, modulus_bits=self.modulus_bits,
            max_noise_multiplier=self.max_noise_multiplier, min_colluders=self.min_colluders, noise=self.noise)


def plan_to_json(plan: DistributedPlan, unit: str = "person") -> str:
    return json.dumps({"mechanism": UNITS[unit].id, **asdict(plan)})


_PLAN_FIELDS = {f.name: f.type for f in fields(DistributedPlan)}


def accept_plan(text: Any, config: SecAggConfig, dimension: int, policy: NodePrivacy) -> DistributedPlan:
    """The server's plan, checked against itself, the round's secure-aggregation config and the node's policy."""
    if not isinstance(text, str) or len(text) > 8192:
        raise UnacceptablePlan("the round's DP plan is missing or not a short JSON text")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        raise UnacceptablePlan("the round's DP plan is not JSON") from None
    wanted = UNITS[policy.unit].id
    if not isinstance(raw, dict) or raw.pop("mechanism", None) != wanted or set(raw) != set(_PLAN_FIELDS):
        raise UnacceptablePlan(f"this node takes part only with a {wanted} plan (its unit is {policy.unit}) with the "
                               f"fields {sorted(_PLAN_FIELDS)}")
    if raw.pop("noise") != policy.noise:
        raise UnacceptablePlan(f"this node takes part only with {policy.noise} noise shares (its policy's family)")
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise UnacceptablePlan(f"the DP plan's field {name!r} must be a finite number >= 0, got {value!r}")
    integers = ("dimension", "steps", "clients", "min_inputs", "colluders", "modulus_bits", "sum_bound", "records")
    if any(float(raw[name]) != int(raw[name]) for name in integers):
        raise UnacceptablePlan(f"the DP plan's fields {integers} must be whole numbers")
    plan = DistributedPlan(**{name: int(raw[name]) if name in integers else float(raw[name]) for name in raw},
                           noise=policy.noise)
    problems = []
    noised = dimension - (1 if policy.unit == "record" else 0)  # record level: the last word is the record count
    if plan.dimension != noised:
        problems.append(f"it is for {plan.dimension} coordinates, the round's arrays have {noised}")
    if min(plan.mu, plan.share_variance, plan.scale, plan.max_grad_norm) <= 0 or not 0 < plan.sample_rate <= 1:
        problems.append("its variance, scale, clipping bound or participation rate is out of range")
    else:
        l1, l2 = sensitivities(plan.max_grad_norm, plan.scale, plan.dimension)
        if not (math.isclose(l1, plan.l1, rel_tol=1e-9) and math.isclose(l2, plan.l2, rel_tol=1e-9)):
            problems.append("its sensitivities are not those of its clipping bound, scale and dimension")
    if plan.clients != config.num_clients:
        problems.append(f"it is for {plan.clients} nodes, the round has {config.num_clients}")
    if (config.encoding != "integer" or config.integer_sum_bound != plan.sum_bound
            or config.min_inputs != plan.min_inputs or config.modulus_bits != plan.modulus_bits):
        problems.append("the secure-aggregation config does not enforce it (integer encoding, sum bound, minimum "
                        "inputs, modulus)")
    if plan.min_inputs < min_inputs(plan.clients, policy.min_inputs_fraction) or plan.min_inputs > plan.clients:
        problems.append(f"its minimum of {plan.min_inputs} included inputs is below this node's "
                        f"{min_inputs(plan.clients, policy.min_inputs_fraction)} (or above the round's nodes)")
    if plan.colluders < policy.colluders(plan.clients):
        problems.append(f"it is sized for {plan.colluders} colluders, this node assumes "
                        f"{policy.colluders(plan.clients)}")
    if plan.share_variance > 0 and plan.scale > 0:
        # a bound too small for an honest sum would make a node's error depend on its data and coin
        needed = (plan.records * plan.max_grad_norm * plan.scale + plan.clients
                  + plan.family.tail_bound(plan.clients * plan.share_variance,
                                           float(plan.dimension) * max(plan.steps, 1)))
        if plan.sum_bound < needed:
            problems.append(f"its sum bound {plan.sum_bound} is below the {needed:.4g} its own clients, clipping "
                            "bound, scale and noise need")
    if policy.unit == "person" and plan.records != plan.clients:
        problems.append("a person-level plan bounds the sum by its clients' updates (records = clients)")
    honest = plan.min_inputs - plan.colluders
    if honest < 1 or plan.share_variance * honest < plan.mu * (1 - 1e-9):
        problems.append(f"{max(honest, 0)} honest shares of variance {plan.share_variance:.4g} do not carry its "
                        f"variance {plan.mu:.4g}")
    elif plan.mu > 0:
        try:
            plan.family.check_shares(plan.mu, honest)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise UnacceptablePlan("this node refuses the round's DP plan: " + "; ".join(problems))
    return plan


__all__ = ["BudgetExhausted", "DistributedDP", "NodeLedgerError", "NodePrivacy", "NodePrivacyError",
           "UNITS", "UnacceptablePlan", "accept_plan", "plan_to_json"]
