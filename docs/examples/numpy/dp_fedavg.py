"""Person-level distributed DP in a plain NumPy FL loop (privfer's recipe, no simulation, no torch).

Forty clients fit y = X w on their own data; each round every client sends its clipped update plus its own noise
share through privfer's secure aggregation (active security: an in-process enrollment authority), the server
applies the noisy mean, and a ledger that `privfer audit` recomputes is written. Run it:

    python docs/examples/numpy/dp_fedavg.py /tmp/ledger.json
"""

import sys

import numpy as np

from privfer.privacy import recipe
from privfer.secagg import aggregate, enroll_in_process


def main(ledger_path: str, rounds: int = 5, clients: int = 40, epsilon: float = 3.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    true_w = rng.normal(size=5)
    data = {c: rng.normal(size=(40, 5)) for c in range(1, clients + 1)}
    targets = {c: x @ true_w + rng.normal(0, 0.1, 40) for c, x in data.items()}
    plan = recipe.plan_run(epsilon=epsilon, delta=1e-4, rounds=rounds, clients=clients, dimension=5,
                           max_update_norm=1.5)
    config = recipe.secagg_config(plan)
    enrollments = enroll_in_process(range(1, clients + 1))  # the enrollment authority: not the server
    run, w = recipe.RunLedger(), np.zeros(5)
    start_loss = np.mean([np.mean((x @ w - targets[c]) ** 2) for c, x in data.items()])
    for _ in range(rounds):
        updates = {c: -0.3 * 2 * x.T @ (x @ w - targets[c]) / len(x) for c, x in data.items()}  # one local step
        contributions = {c: [recipe.contribute(u, plan)] for c, u in updates.items()}  # on each client
        summed = aggregate(contributions, config, enrollments={c: type(e)(c, e.identity, e.certificate)
                                                               for c, e in enrollments.items()})
        w = w + recipe.mean_update(summed.total[0], plan, len(summed.included))
        run.record(summed.included)
    recipe.write_ledger(ledger_path, plan, run, persons=clients)
    end_loss = np.mean([np.mean((x @ w - targets[c]) ** 2) for c, x in data.items()])
    return {"start_loss": float(start_loss), "end_loss": float(end_loss), "epsilon": run.epsilon(plan, 1)}


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else "ledger.json"))
