"""The canary audit of local DP-SGD: canaries in the worst-case client's own training (white- or blackbox)."""

from __future__ import annotations

import time

import numpy as np
import torch

from privfer.auditing.empirical.base import CanaryAudit, audit_ceiling, correct_guesses
from privfer.config import PrivferConfig
from privfer.data.clips import ClipSet
from privfer.fl.client import FLClient
from privfer.fl.mechanisms import local_training
from privfer.fl.rounds import TRAINING
from privfer.fl.simulation import prepare_federation
from privfer.models.loss import LabelLoss
from privfer.models.vfer import VFER
from privfer.privacy.calibrate import epsilon_spent
from privfer.privacy.mechanisms.local import MECHANISM
from privfer.privacy.one_run import epsilon_lower_bound

def audit(config: PrivferConfig, kind: str, canaries: int, guesses: int, seed: int,
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
    correct = correct_guesses(scores, included, guesses)
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


__all__ = ["MECHANISM", "audit"]
