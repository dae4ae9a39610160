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

Each mechanism's canary audit is one file of this package, registered by one
line in ``_MODULES`` under the id of the mechanism it names (its
``MECHANISM``, :mod:`privfer.privacy.mechanisms`).
"""

from __future__ import annotations

import importlib

from privfer.auditing.empirical.base import KINDS, CanaryAudit, audit_ceiling, check_counts
from privfer.config import PrivferConfig
from privfer.data.clips import ClipSet
from privfer.privacy.mechanisms.local import MECHANISM as _LOCAL

_MODULES = (  # one line per mechanism's canary audit
    "local",
    "distributed",
    "distributed_person",
)
CANARY_AUDITS = {}  # mechanism id -> its canary audit
for _module in _MODULES:
    _loaded = importlib.import_module(f"{__name__}.{_module}")
    if _loaded.MECHANISM.id in CANARY_AUDITS:
        raise RuntimeError(f"two canary audits claim the mechanism {_loaded.MECHANISM.id!r}")
    CANARY_AUDITS[_loaded.MECHANISM.id] = _loaded.audit


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
    check_counts(canaries, guesses)
    if config.mechanism_id is None:  # without DP: the local audit, clipping and no noise, on the local line (a
        # baseline of the audit's power, whatever algorithm the run's line trains without DP: docs/auditing.md)
        config = type(config).model_validate({**config.to_dict(),
                                              "privacy": {**config.privacy.model_dump(mode="json"),
                                                          "mechanism": _LOCAL.selected_by}})
    return CANARY_AUDITS[config.mechanism_id or _LOCAL.id](config, kind, canaries, guesses, seed, clips, delta)


from privfer.auditing.empirical.sweep import plot_sweep, run_sweep  # noqa: E402 (it runs run_canary_audit)

__all__ = ["CANARY_AUDITS", "KINDS", "CanaryAudit", "audit_ceiling", "plot_sweep", "run_canary_audit", "run_sweep"]
