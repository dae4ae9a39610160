"""A sweep of canary audits over budgets, kinds and seeds, and its plot."""

from __future__ import annotations

from privfer.auditing.empirical import run_canary_audit
from privfer.auditing.empirical.base import KINDS, CanaryAudit
from privfer.config import PrivferConfig
from privfer.data.clips import ClipSet

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


__all__ = ["plot_sweep", "run_sweep"]
