"""Empirical privacy audit with one training run (Steinke, Nasr and Jagielski 2023).

One client — the training actor with the most clips, trained as the
worst-case client of the run's plan (every round, same noise multiplier,
sample rate, clipping bound, optimizer and learning rate) — gets m canaries,
each included independently with probability 1/2. After its whole-run
training the auditor scores every canary, guesses "included" for the r/2
highest scores and "excluded" for the r/2 lowest, and turns the number of
correct guesses into a 95%-confidence lower bound on epsilon
(:mod:`privfer.privacy.one_run`). Two canary kinds:

* ``whitebox`` — gradient canaries: canary j is a record whose clipped
  gradient is ``C e_j`` for a coordinate j of the model (a Dirac direction of
  the largest norm DP-SGD allows). Like every record it is Poisson-sampled at
  each step with the client's sample rate, and it enters the clipped sum
  before the noise. Score: minus the client's total update at coordinate j —
  what a server that saw the update could compute.
* ``blackbox`` — input canaries: clips of random frames with a random label,
  added to the client's data. Score: minus the canary's loss on the final
  model.

The bound is only as strong as the attack: a bound below the claimed epsilon
is what DP promises, not a proof of it; a bound above it is evidence of a bug.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from privfer.config import PrivferConfig
from privfer.data.clips import ClipSet
from privfer.fl.client import FLClient
from privfer.fl.mechanisms import local_training
from privfer.fl.rounds import TRAINING
from privfer.fl.simulation import prepare_federation
from privfer.models.loss import LabelLoss
from privfer.models.vfer import VFER
from privfer.privacy.calibrate import epsilon_spent
from privfer.privacy.one_run import ceiling, epsilon_lower_bound

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


def _correct_guesses(scores: np.ndarray, included: np.ndarray, guesses: int) -> int:
    """Guess "included" for the guesses/2 highest scores and "excluded" for the guesses/2 lowest; count the hits."""
    order = np.argsort(scores, kind="stable")
    half = guesses // 2
    return int(included[order[-half:]].sum() + (~included[order[:half]]).sum())


def _check(canaries: int, guesses: int) -> None:
    if canaries < 2 or guesses < 2 or guesses > canaries or guesses % 2:
        raise ValueError(f"need 2 <= guesses <= canaries and an even number of guesses, got {guesses} of {canaries}")


def run_canary_audit(
    config: PrivferConfig,
    *,
    kind: str = "whitebox",
    canaries: int = 1000,
    guesses: int = 100,
    seed: int = 0,
    clips: ClipSet | None = None,
    delta: float = 1e-5,
) -> CanaryAudit:
    """Train the run's worst-case client once with m canaries and bound epsilon from below.

    Both the bound and the claim it is compared with are stated at ``delta``
    (the accountant gives the claimed epsilon at any delta): the one-run bound
    pays ``2 m delta``, so at a run's own delta of about 1e-3 a thousand
    canaries could certify almost nothing.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _check(canaries, guesses)
    return CANARY_AUDITS[config.mechanism_id or "local"](config, kind, canaries, guesses, seed, clips, delta)


def _local_canary_audit(config: PrivferConfig, kind: str, canaries: int, guesses: int, seed: int,
                        clips: ClipSet | None, delta: float) -> CanaryAudit:
    """Canaries in the worst-case client's local DP-SGD training (white- or blackbox)."""
    started = time.perf_counter()
    federation = prepare_federation(config.model_copy(update={"federation": config.federation.model_copy(
        update={"adaptation": False})}), clips)
    clients = federation.clients[TRAINING]
    client_id = max(clients, key=lambda c: (clients[c].records, -c))
    client, plan = clients[client_id], federation.plans[TRAINING][client_id]
    sigma = plan.noise_multiplier if plan.noise_multiplier is not None else 0.0  # DP off: clipping, no noise
    rng = np.random.default_rng([seed, 0xA0D17])
    included = rng.random(canaries) < 0.5

    torch.manual_seed(config.seed)
    model = VFER.from_config(config.model, federation.feature_dim, private=True)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [model.get_parameter(n).numel() for n in names]
    local = local_training(config, TRAINING, sigma)
    step_rng = np.random.default_rng([seed, 0x57E9])

    trainer = client
    before_step = None
    if kind == "whitebox":
        if canaries > sum(sizes):
            raise ValueError(f"{canaries} canaries but the model has {sum(sizes)} coordinates; use at most "
                             f"{sum(sizes)} (--canaries)")
        coordinates = rng.choice(sum(sizes), size=canaries, replace=False)
        offsets = np.cumsum([0, *sizes])
        members = coordinates[included]

        def before_step(module: torch.nn.Module) -> None:
            # Each included canary is a record: Poisson-sampled with the client's rate, gradient C e_j.
            sampled = members[step_rng.random(len(members)) < plan.sample_rate]
            for index, name in enumerate(names):
                mine = sampled[(sampled >= offsets[index]) & (sampled < offsets[index + 1])] - offsets[index]
                if len(mine) == 0:
                    continue
                parameter = module.get_parameter(name)
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                parameter.grad.view(-1)[torch.from_numpy(mine)] += config.privacy.max_grad_norm
    else:
        frames = rng.normal(size=(canaries, client.features.shape[1], client.features.shape[2])).astype(np.float32)
        frames *= float(client.features.std())
        labels = rng.integers(0, 6, size=canaries)
        targets = np.eye(6, dtype=np.float32)[labels] if client.targets.dtype.is_floating_point else labels
        trainer = FLClient(
            client_id,
            np.concatenate([client.features.numpy(), frames[included]]),
            np.concatenate([client.targets.numpy(), targets[included]]),
        )

    state, history = dict(start), []
    for round_index in range(1, config.federation.rounds + 1):  # the worst case: every round, continuing from its own model
        update = trainer.fit(config, state, list(state), local, history=history,
                             seed=seed * 100_003 + round_index, before_step=before_step)
        history = update.history
        state = {name: state[name] + update.delta[name] for name in state}

    if kind == "whitebox":
        total = torch.cat([(state[n] - start[n]).reshape(-1) for n in names]).numpy()
        scores = -total[coordinates]  # gradient descent moves against the canary's +C e_j
    else:
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(frames))
            target = torch.from_numpy(targets)
            scores = -LabelLoss("none")(logits, target).numpy()
    correct = _correct_guesses(scores, included, guesses)
    return CanaryAudit(
        kind=kind,
        canaries=canaries,
        guesses=guesses,
        correct=correct,
        epsilon_lower_bound=epsilon_lower_bound(canaries, guesses, correct, delta),
        ceiling=audit_ceiling(canaries, guesses, delta),
        # What the accountant says this training (canaries included) spent: the claim the bound is held to.
        claimed_epsilon=epsilon_spent(history, delta, config.privacy.accountant) if sigma > 0 else None,
        noise_multiplier=sigma,
        sample_rate=plan.sample_rate,
        steps=sum(int(t) for _, _, t in history),
        delta=delta,
        client=client_id,
        records=client.records,
        seconds=time.perf_counter() - started,
    )




def _training_plan(config: PrivferConfig, clips: ClipSet | None, canaries: int, verb: str) -> tuple[Any, Any]:
    """The federation (without adaptation) and its training phase's distributed plan, with room for the canaries
    (one model coordinate each)."""
    federation = prepare_federation(config.model_copy(update={"federation": config.federation.model_copy(
        update={"adaptation": False})}), clips)
    plan = federation.plans[TRAINING]
    if canaries > plan.dimension:
        raise ValueError(f"{canaries} canaries but the model {verb} {plan.dimension} coordinates")
    return federation, plan


def _distributed_canary_audit(config: PrivferConfig, kind: str, canaries: int, guesses: int, seed: int,
                              clips: ClipSet | None, delta: float) -> CanaryAudit:
    """Whitebox canaries against distributed DP-SGD, the auditor holding only what the server sees.

    Canary j is a record of the worst-case client (the one with the most clips)
    whose clipped gradient is ``C e_j``; it is Poisson-sampled at the plan's
    rate every round. Every client of the round encodes its contribution with
    the real :func:`~privfer.privacy.distributed.encode_contribution`
    (randomized rounding, its own noise share) and the contributions are
    summed by the real masking protocol. The auditor gets every other record's
    gradient for free (the background is zero: the strongest auditor), so the
    noise in the released sums is all that stands in its way. Score: the
    canary coordinate of the released sums, added over the rounds. Only the
    canaries' coordinates are simulated: the noise is independent per
    coordinate, so the others change nothing the auditor could use.
    """
    from privfer.fl.aggregation import sum_integer_contributions
    from privfer.privacy.distributed import encode_contribution, noise_generator

    if kind != "whitebox":
        raise ValueError("the distributed mechanism is audited with whitebox canaries (the auditor sees only "
                         "unmasked sums); blackbox canaries need a model trained by privfer simulate")
    started = time.perf_counter()
    federation, plan = _training_plan(config, clips, canaries, "has")
    clients = sorted(federation.clients[TRAINING])
    client_id = max(clients, key=lambda c: (federation.clients[TRAINING][c].records, -c))
    # The guarantee's worst case: only the m_honest honest shares the trust sizing counts on (the others, colluders
    # who subtract their own shares, add nothing), so the released sums carry exactly mu.
    others = [c for c in clients if c != client_id][: plan.honest - 1]
    cohort = [client_id, *others]
    if len(cohort) < 2:
        raise ValueError("the canary audit needs at least two honest clients in the plan")
    rng = np.random.default_rng([seed, 0xA0D17])
    included = rng.random(canaries) < 0.5
    released = np.zeros(canaries)
    for round_index in range(1, plan.steps + 1):
        contributions = {}
        for c in cohort:
            own = noise_generator()
            vector = np.zeros(canaries)
            if c == client_id:
                sampled = included & (own.random(canaries) < plan.sample_rate)
                vector[sampled] = plan.max_grad_norm
            contributions[c] = encode_contribution(vector, plan, own)
        # The plan's minimum inputs exceed these m_honest clients: sum them with a plan for this cohort.
        summed = sum_integer_contributions(contributions, {}, config.aggregation,
                                           replace(plan, min_inputs=len(cohort), clients=len(cohort)),
                                           round_id=f"canary-audit:{seed}:{round_index}")
        if summed.aborted is not None:
            raise RuntimeError(f"a canary-audit round aborted: {summed.aborted}")
        released += summed.total / plan.scale
    correct = _correct_guesses(released, included, guesses)
    history = [plan.steps_entry(plan.steps)]
    return CanaryAudit(
        kind="whitebox", canaries=canaries, guesses=guesses, correct=correct,
        epsilon_lower_bound=epsilon_lower_bound(canaries, guesses, correct, delta),
        ceiling=audit_ceiling(canaries, guesses, delta),
        claimed_epsilon=plan.family.epsilon(history, delta)[0],
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps, delta=delta,
        client=client_id, records=federation.clients[TRAINING][client_id].records,
        seconds=time.perf_counter() - started,
    )


def _person_canary_audit(config: PrivferConfig, kind: str, canaries: int, guesses: int, seed: int,
                         clips: ClipSet | None, delta: float) -> CanaryAudit:
    """Canary PERSONS against person-level distributed DP, the auditor holding only what the server sees.

    Each canary is a whole client of its own, in every round of the run (who
    takes part is public under the zero-out relation). An included canary
    (probability 1/2) has the update ``S e_j`` — the largest a person may
    move the sum, all on its own coordinate j — and flips its secret coin
    every round (heads with the plan's participation rate); an excluded canary
    submits zeros. The noise comes only from the ``m_honest`` honest clients
    the trust sizing counts on (the canaries add none: the guarantee's worst
    case, every released sum carrying exactly mu). Every contribution goes
    through the real masking protocol. Score: the canary's coordinate of the
    released sums, added over the rounds.
    """
    from privfer.fl.aggregation import sum_integer_contributions
    from privfer.privacy.distributed import encode_contribution, noise_generator, randomized_round
    from privfer.privacy.person import secret_coin

    if kind != "whitebox":
        raise ValueError("the person-level mechanism is audited with whitebox canary persons (the auditor sees only "
                         "unmasked sums)")
    started = time.perf_counter()
    federation, plan = _training_plan(config, clips, canaries, "shares")
    rng = np.random.default_rng([seed, 0xA0D17])
    included = rng.random(canaries) < 0.5
    first = 1 + max(federation.clients[TRAINING])  # canary ids after the real clients' (their data is not used)
    canary_ids = list(range(first, first + canaries))
    noise_ids = list(range(first + canaries, first + canaries + plan.honest))
    cohort_plan = replace(plan, dimension=canaries, min_inputs=canaries + plan.honest,
                          clients=canaries + plan.honest)
    released = np.zeros(canaries)
    for round_index in range(1, plan.steps + 1):
        contributions = {}
        for j, c in enumerate(canary_ids):
            own = noise_generator()
            vector = np.zeros(canaries)
            if secret_coin(own, plan.sample_rate) and included[j]:
                vector[j] = plan.max_grad_norm
            contributions[c] = randomized_round(vector * plan.scale, own)
        for c in noise_ids:
            contributions[c] = encode_contribution(np.zeros(canaries), plan, noise_generator())
        summed = sum_integer_contributions(contributions, {}, config.aggregation, cohort_plan,
                                           round_id=f"person-canary-audit:{seed}:{round_index}")
        if summed.aborted is not None:
            raise RuntimeError(f"a canary-audit round aborted: {summed.aborted}")
        released += summed.total / plan.scale
    correct = _correct_guesses(released, included, guesses)
    return CanaryAudit(
        kind="whitebox", canaries=canaries, guesses=guesses, correct=correct,
        epsilon_lower_bound=epsilon_lower_bound(canaries, guesses, correct, delta),
        ceiling=audit_ceiling(canaries, guesses, delta),
        claimed_epsilon=plan.family.epsilon([plan.steps_entry(plan.steps)], delta)[0],
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps, delta=delta,
        client=canary_ids[0], records=0, seconds=time.perf_counter() - started,
    )


CANARY_AUDITS = {"local": _local_canary_audit, "distributed": _distributed_canary_audit,
                 "distributed_person": _person_canary_audit}  # by mechanism id


def run_sweep(
    config: PrivferConfig,
    epsilons: list[float | None],
    *,
    kinds: tuple[str, ...] = ("whitebox",),
    seeds: int = 1,
    canaries: int = 1000,
    guesses: int = 100,
    clips: ClipSet | None = None,
    delta: float = 1e-5,
    on_result=None,
) -> list[CanaryAudit]:
    """One canary audit per epsilon (None: DP off), kind and seed, on the same config otherwise."""
    results = []
    for epsilon in epsilons:
        setting = config.model_copy(update={"privacy": config.privacy.model_copy(update={"epsilon": epsilon})})
        for kind in kinds:
            for seed in range(seeds):
                result = run_canary_audit(setting, kind=kind, canaries=canaries, guesses=guesses, seed=seed,
                                          clips=clips, delta=delta)
                results.append(result)
                if on_result is not None:
                    on_result(result)
    return results


def plot_sweep(results: list[CanaryAudit], path) -> None:
    """PNG: empirical lower bound against the claimed epsilon, one marker per kind; DP off at the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r.claimed_epsilon for r in results if r.claimed_epsilon is not None]
    right = 1.5 * max(finite) if finite else 10.0
    fig, ax = plt.subplots(figsize=(6, 4.5))
    top = max([right] + [r.ceiling for r in results])
    ax.plot([0, top], [0, top], color="grey", linestyle="--", label="lower bound = claimed epsilon")
    for kind, marker, side in zip(KINDS, ("o", "s"), (-1, 1)):
        mine = [r for r in results if r.kind == kind]
        if not mine:
            continue
        # DP-off points sit on the right edge, the two kinds side by side so neither hides the other.
        xs = [r.claimed_epsilon if r.claimed_epsilon is not None else right * (1 + 0.025 * side) for r in mine]
        ax.scatter(xs, [r.epsilon_lower_bound for r in mine], marker=marker, label=f"{kind} canaries", zorder=3)
    ceiling_value = max(r.ceiling for r in results)
    ax.axhline(ceiling_value, color="tab:red", linewidth=0.8, label=f"ceiling ({results[0].canaries} canaries, "
               f"{results[0].guesses} guesses): {ceiling_value:.2f}")
    ax.axvline(right, color="black", linewidth=0.5)
    ax.text(right, 0.02 * top, " DP off", rotation=90, va="bottom")
    ax.set_xlabel(f"claimed epsilon (accountant, delta {results[0].delta:g})")
    ax.set_ylabel("empirical epsilon lower bound (95%)")
    ax.set_xlim(0, right * 1.08)
    ax.set_ylim(0, top * 1.05)
    ax.set_title("One-run privacy audit (Steinke, Nasr, Jagielski 2023)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["CanaryAudit", "KINDS", "audit_ceiling", "plot_sweep", "run_canary_audit", "run_sweep"]
