"""What a privacy budget buys: central Opacus DP-SGD (a trusted curator) vs privfer's distributed DP, side by side.

    python benchmarks/privacy_utility.py                       # epsilon 1, 3, 8; 2 seeds (about 40 minutes)
    python benchmarks/privacy_utility.py --epsilons 3 --seeds 1

Both train the VFER on the same split and the same 5,483 training clips of the
default synthetic data, at the same delta (privfer's default, 1 / (10 x the
federation's records)), and report macro F1 on the test actors' evaluation
halves after training (no adaptation phase):

* **central**: one curator holds every clip and runs Opacus DP-SGD
  (``make_private_with_epsilon``, Poisson batches of expected size 512,
  20 epochs, Adam lr 5e-3, C = 1, PRV accountant, the fast DP LSTM with
  ghost clipping) — the setting of REFERENCES' anchors, and what privfer
  could deliver if the server were trusted. It trains the very model privfer's
  run at that epsilon trains (the resolved ``model`` section: 64 hidden units,
  mean readout, the linear shortcut), so the ratio is the cost of distributing
  the trust alone;
* **privfer**: ``privfer simulate --epsilon E`` with its defaults: every
  training client's clipped gradient sum and Skellam noise share through the
  real masking protocol each round, the noise sized for at most 10% colluders
  and at least 90% included inputs, Skellam RDP accounting.

The ratio privfer / central is what distributing the trust costs.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def central(epsilon: float, delta: float, seed: int, parts, feature_dim: int, config, *, lr: float = 5e-3,
            batch_size: int = 512, epochs: int = 20) -> tuple[float, float, float]:
    """(test macro F1, epsilon spent, seconds) of central Opacus DP-SGD at (epsilon, delta) with ``config``'s model;
    benchmarks/foreign_data.py runs it over a grid of lr and batch size."""
    from opacus import PrivacyEngine

    from privfer.data.labels import training_targets
    from privfer.evaluation import evaluate
    from privfer.models.vfer import VFER
    from privfer.models.loss import LabelLoss

    torch.manual_seed(seed)
    model = VFER.from_config(config.model, feature_dim, private=True)
    train = parts["train"]
    data = torch.utils.data.TensorDataset(torch.from_numpy(train.features),
                                          torch.from_numpy(training_targets(train, "partial")))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, generator=torch.Generator().manual_seed(seed))
    engine = PrivacyEngine(accountant="prv")
    private, optimizer, criterion, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.Adam(model.parameters(), lr=lr), data_loader=loader,
        target_epsilon=epsilon, target_delta=delta, epochs=epochs, max_grad_norm=1.0, grad_sample_mode="ghost",
        criterion=LabelLoss())
    started = time.perf_counter()
    for _ in range(epochs):
        private.train()
        for x, y in loader:
            if len(x) == 0:  # a Poisson batch may be empty (small data sets); it carries no gradient
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(private(x), y)
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    return evaluate(private._module, parts["test_eval"], "intended")["macro"]["f1"], engine.get_epsilon(delta), seconds


def distributed(epsilon: float, seed: int, clips) -> tuple[float, float, float, float]:
    from privfer.config import load_config
    from privfer.fl.simulation import simulate

    config = load_config(None, [f"privacy.epsilon={epsilon}", f"seed={seed}", "federation.adaptation=false",
                                "output.save_model=false"])
    started = time.perf_counter()
    result = simulate(config, None, clips=clips)
    seconds = time.perf_counter() - started
    return result.macro_f1, result.privacy.epsilon_max, seconds, result.privacy.delta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    from privfer.config import load_config
    from privfer.data import load_clips
    from privfer.data.splits import split_run

    config = load_config()
    clips = load_clips(config.data)
    torch.set_num_threads(2)
    print(f"{'epsilon':>7} {'seed':>4} {'central F1':>10} {'eps':>6} {'s':>5} {'privfer F1':>10} {'eps':>6} {'s':>5}",
          flush=True)
    rows = []
    for epsilon in [float(e) for e in args.epsilons.split(",")]:
        pair = {"central": [], "privfer": []}
        for seed in range(args.seeds):
            f1_d, eps_d, sec_d, delta = distributed(epsilon, seed, clips)
            _, parts = split_run(clips, config.data, seed)
            same_model = load_config(None, [f"privacy.epsilon={epsilon}"])  # the model privfer's run trains
            f1_c, eps_c, sec_c = central(epsilon, delta, seed, parts, clips.feature_dim, same_model)
            pair["central"].append(f1_c)
            pair["privfer"].append(f1_d)
            print(f"{epsilon:>7g} {seed:>4} {f1_c:>10.3f} {eps_c:>6.2f} {sec_c:>5.0f} {f1_d:>10.3f} {eps_d:>6.2f} "
                  f"{sec_d:>5.0f}", flush=True)
        c, d = statistics.mean(pair["central"]), statistics.mean(pair["privfer"])
        rows.append((epsilon, c, d))
    print("\n| epsilon | central Opacus DP-SGD | privfer distributed | ratio |")
    print("|---|---|---|---|")
    for epsilon, c, d in rows:
        print(f"| {epsilon:g} | {c:.3f} | {d:.3f} | {d / c:.2f} |")


if __name__ == "__main__":
    main()
