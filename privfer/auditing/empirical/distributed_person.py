"""The canary audit of person-level distributed DP: canary persons, the auditor holding what the server sees."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from privfer.auditing.empirical.base import CanaryAudit, audit_ceiling, correct_guesses, training_plan
from privfer.config import PrivferConfig
from privfer.data.clips import ClipSet
from privfer.fl.rounds import TRAINING
from privfer.privacy.mechanisms.distributed_person import MECHANISM
from privfer.privacy.one_run import epsilon_lower_bound

def audit(config: PrivferConfig, kind: str, canaries: int, guesses: int, seed: int,
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
    federation, plan = training_plan(config, clips, canaries, "shares")
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
    correct = correct_guesses(released, included, guesses)
    return CanaryAudit(
        kind="whitebox", canaries=canaries, guesses=guesses, correct=correct,
        epsilon_lower_bound=epsilon_lower_bound(canaries, guesses, correct, delta),
        ceiling=audit_ceiling(canaries, guesses, delta),
        claimed_epsilon=plan.family.epsilon([plan.steps_entry(plan.steps)], delta)[0],
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps, delta=delta,
        client=canary_ids[0], records=0, seconds=time.perf_counter() - started,
    )


__all__ = ["MECHANISM", "audit"]
