"""The canary audit of record-level distributed DP-SGD: whitebox canaries, the auditor holding what the server sees."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from privfer.auditing.empirical.base import CanaryAudit, audit_ceiling, correct_guesses, training_plan
from privfer.config import PrivferConfig
from privfer.data.clips import ClipSet
from privfer.fl.rounds import TRAINING
from privfer.privacy.mechanisms.distributed import MECHANISM
from privfer.privacy.one_run import epsilon_lower_bound

def audit(config: PrivferConfig, kind: str, canaries: int, guesses: int, seed: int,
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
    federation, plan = training_plan(config, clips, canaries, "has")
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
    correct = correct_guesses(released, included, guesses)
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


__all__ = ["MECHANISM", "audit"]
