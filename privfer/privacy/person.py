"""Person-level distributed DP: DP-FedAvg with the noise in the secure sum, and secret participation.

The protected unit is a person: everything one client holds, however many
clips. In a round every selected client

1. flips its own secret coin, heads with probability ``p``
   (``privacy.participation``), from its secret generator (the same ChaCha20
   stream its noise share comes from; the server never holds the key);
2. trains locally as it likes (local epochs, no per-record noise) from the
   global model;
3. clips its whole update of the shared parameters to L2 norm ``S``
   (``privacy.max_update_norm``) — heads — or takes the zero vector — tails;
4. encodes that vector as integers (randomized rounding at the plan's scale)
   and adds its noise share, exactly as record-level distributed DP
   (:func:`privfer.privacy.distributed.encode_contribution`), and submits only
   that through secure aggregation. No count, loss or metric leaves it.

The server unmasks the integer sum, divides it by the public denominator
``p x (clients included)`` — never by the secret number of heads — and steps
its optimizer with the negated mean as the pseudo-gradient (DP-FedAvg,
McMahan et al., ICLR 2018; here the noise is added by the clients inside the
sum instead of by a trusted server).

Why the coin amplifies although the server picks and sees the cohort: the
masked input of a tails client is a uniformly random word vector like every
other (the masks), of the same length, with the same noise share; what the
server learns is the sum, in which a person's update is present with
probability ``p``, independently of everything else. Against a person that
is Poisson subsampling at rate ``p`` per round they are selected in, and the
accountant amplifies by it (docs/privacy-accounting.md, "Person level").
"""

from __future__ import annotations

import math

import numpy as np

from privfer.privacy.distributed import DistributedPlan, encode_contribution


def secret_coin(rng: np.random.Generator, participation: float) -> bool:
    """The client's coin: heads with probability ``participation``. Always one draw (also at p = 1), so the
    generator's later output does not depend on the setting."""
    if not 0.0 < participation <= 1.0:
        raise ValueError(f"participation must be in (0, 1], got {participation}")
    return bool(rng.random() < participation)


def clip_update(update: np.ndarray, bound: float) -> np.ndarray:
    """``update`` scaled to L2 norm at most ``bound`` (unchanged when already within it)."""
    flat = np.asarray(update, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(flat))
    if not math.isfinite(norm):
        raise ValueError("a client's update is not finite: it cannot be clipped")
    return flat if norm <= bound else flat * (bound / norm)


def person_contribution(update: np.ndarray, heads: bool, plan: DistributedPlan,
                        rng: np.random.Generator) -> np.ndarray:
    """A selected client's integer contribution: its clipped update (heads) or zeros (tails), rounded at the
    plan's scale, plus its noise share — the same length and noise either way. The update is checked (finite,
    the plan's length) whatever the coin says, so an error never tells the coin."""
    if update is None:
        raise ValueError("a selected client computes its update whatever its coin says (constant work)")
    clipped = clip_update(update, plan.max_grad_norm)
    if clipped.size != plan.dimension:
        raise ValueError(f"the update has {clipped.size} coordinates, the plan {plan.dimension}")
    return encode_contribution(clipped if heads else np.zeros(plan.dimension), plan, rng)


def mean_update(decoded_sum: np.ndarray, plan: DistributedPlan, included: int) -> np.ndarray:
    """The server's estimate of the mean clipped update: the decoded sum over the PUBLIC denominator
    ``p x included`` (dividing by the number of heads would reveal the coins)."""
    if included < 1:
        raise ValueError("no included client")
    return np.asarray(decoded_sum, dtype=np.float64) / (plan.sample_rate * included)


__all__ = ["clip_update", "mean_update", "person_contribution", "secret_coin"]
