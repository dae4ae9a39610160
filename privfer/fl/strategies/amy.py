"""AMY (Ding, Yan, Lu, Xue, Wang, "Uncertainty-Aware Label Refinement on Hypergraphs for Personalized Federated
Facial Expression Recognition", IEEE TCSVT 2025): each client refines its labels on a hypergraph of its own clips.

Every training round, before it trains, a client runs the model it received on
its clips and reads each clip's embedding (the backbone's output: the VFER's
read-out of its LSTM states over the per-frame face features; ``space``) and
logits. Then, all of it on the client:

1. **Hypergraph** (:func:`hypergraph`). One hyperedge per clip: the clip and
   its ``neighbours`` nearest clips in embedding space (squared Euclidean
   distance, ties to the lower index), each member with HGNN's probabilistic
   incidence ``H(v, e) = exp(-d(v, e)^2 / sigma^2)`` (1 for the centre;
   ``sigma^2`` the mean squared distance of a clip to its neighbours), so a
   distant member counts less. A hyperedge's weight is its members' mean
   incidence. Its normalised operator (HGNN, Feng et al. AAAI 2019) is
   ``Theta = D_v^-1/2 H W D_e^-1 H^T D_v^-1/2`` (:func:`propagation_operator`).
   A client of at most ``neighbours + 1`` clips (every hyperedge would be the
   whole client) or whose embedding puts every clip at one point trains on
   its own labels that round; one of more than ``max_clips`` is refused when
   the federation is prepared (the hypergraph is N x N, the propagation an
   N x N solve).
2. **Uncertainty estimation (UE) block** (:class:`UncertaintyBlock`, personal:
   its parameters are the client's state and never enter a message). One
   hypergraph convolution ``relu(Theta X W1)`` of each clip's input X (its
   embedding, centred and scaled to unit root-mean-square, beside its label) gives it uncertainty
   features that carry its neighbourhood's embeddings and labels; a linear
   layer reads them with the clip's own input, and a sigmoid gives its
   reliability ``u`` in (0, 1). (The label is part of the input because a
   reliability of the embedding alone could not tell apart two clips at one
   point with different labels, which is what label noise makes.) The paper leaves the estimator's objective
   open beyond "reliable weights"; privfer takes the standard form of Wang et
   al.'s Self-Cure Network (CVPR 2020): the cross-entropy of the reliability-
   scaled logits ``u_i x z_i`` against the clip's label (a clip whose label the
   model believes is fitted better with u large, one it disbelieves with u
   small) plus the rank regularizer ``max(0, margin - (mean u of the top
   rank_share) + (mean u of the rest))``; ``ue_steps`` Adam steps a round on
   the received model's frozen logits, warm-started from last round's block.
3. **Expression classification (EC) block: label propagation**
   (:func:`propagate`, Zhou et al. NeurIPS 2003 on the hypergraph):
   ``F = (1 - alpha)(I - alpha Theta)^-1 (u * Y)``: each clip's label weighted
   by its reliability spreads to its neighbours, so an unreliable clip takes
   its label from theirs. The propagated label is the row of F normalised.
   Propagation flattens the rows (on the default data at 40% label noise
   their mean entropy is about 1.5 nats, the votes' 0.5), so with ``sharpen``
   they are raised to one power, chosen so that their mean entropy is that
   of the client's own labels (each keeps its argmax). With ``blend`` (the
   paper leaves open how refined labels and reliabilities combine) a clip's
   target is ``u x its label + (1 - u) x its propagated label``: a clip the
   block trusts keeps its label, one it does not takes its neighbours'. (On
   clients of a dozen clips, digits', propagation alone took the labels'
   accuracy from 0.60 to 0.42-0.45.) The target is a vote distribution under
   partial labels, its argmax under discrete ones (``sharpen`` applies to
   vote distributions only). With ``weighting`` each clip's loss is also
   weighted by ``u``, and the client trains the shared classifier on them
   with the objective every trainer minimises. (With both on, a clip the
   block distrusts gets its neighbours' label at a small weight: the
   propagated label's share of its loss is ``u (1 - u)``, at most a quarter,
   so the defaults act mostly as down-weighting.)

For its first ``warmup`` training rounds (of the run, not of the client's
turns) a client trains on its own labels: an untrained model's embedding says
nothing about which clips are alike. The model is shared as FedAvg shares it;
``personal_layers`` keeps the last layers on each client as FedPer does (the
paper's personalisation). Not built: the paper's class-prototype
regularisation in global training, and its backbone (a simplified ResNet-18;
privfer's backbone is the frozen face encoder plus the VFER's LSTM).

Privacy. A clip's refined target depends on the client's other clips (they
are its neighbours on the hypergraph), so one record's influence is no longer
its own clipped gradient: record-level DP's sensitivity bound does not cover
it, and the strategy is refused under every record-level mechanism
(:attr:`~privfer.fl.strategies.base.Strategy.couples_records`). At person level
the whole of a person's contribution is clipped and noised, so the guarantee
holds unchanged, and without DP there is none to break
(docs/privacy-accounting.md, "What a strategy may do with a client's clips").
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from privfer.config import FederationConfig
from privfer.data.clips import NUM_CLASSES
from privfer.fl.rounds import TRAINING
from privfer.fl.strategies.base import ClientData
from privfer.fl.strategies.fedper import FedPer
from privfer.models.vfer import VFER


SMOOTHING = 0.1  # label smoothing of class labels in the UE block's fit


class AMYOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    neighbours: int = Field(5, ge=1, le=256, description="Clips besides its centre in each hyperedge (k of k-NN).")
    alpha: float = Field(0.9, gt=0.0, lt=1.0, description="Label propagation's alpha: how far labels spread.")
    space: Literal["embedding", "logits"] = Field(
        "embedding", description="Where the hypergraph's distances are measured: the model's clip embedding (the "
        "backbone output) or its logits.")
    ue_hidden: int = Field(16, ge=1, le=1024, description="The UE block's hypergraph-convolution width.")
    ue_steps: int = Field(50, ge=0, le=10_000, description="Adam steps the UE block takes each round.")
    ue_lr: float = Field(0.05, gt=0.0, le=1.0, description="The UE block's learning rate.")
    rank_share: float = Field(0.7, gt=0.0, lt=1.0, description="Share of the clips in the rank regularizer's "
                              "high-reliability group.")
    rank_margin: float = Field(0.15, ge=0.0, le=1.0, description="The rank regularizer's margin between the two "
                               "groups' mean reliability.")
    sharpen: bool = Field(True, description="Sharpen the refined vote distributions to the mean entropy of the "
                          "client's own (propagation flattens them; each clip's argmax is kept).")
    blend: bool = Field(True, description="Each clip's target is its own label times its reliability u plus the "
                        "propagated label times 1 - u (false: the propagated label alone).")
    weighting: bool = Field(True, description="Also weight each clip's loss by its reliability.")
    warmup: int = Field(10, ge=0, le=100_000, description="Training rounds of the run in which clients train on "
                        "their own labels.")
    max_clips: int = Field(4096, ge=2, le=65_536, description="The most clips a client may hold (its hypergraph is "
                           "N x N and its propagation an N x N solve: memory N^2, time N^3); more is refused when the "
                           "federation is prepared.")
    personal_layers: int = Field(0, ge=0, le=16, description="Layers (from the head down) kept on each client, as "
                                 "FedPer; 0 shares the whole model, as FedAvg.")


def neighbourhoods(points: torch.Tensor, neighbours: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(N, d) points -> each clip's hyperedge: its members (N, k + 1), the clip first, then its k = min(neighbours,
    N - 1) nearest (squared Euclidean distance; ties to the lower index), their squared distances to it, and
    sigma^2, the mean squared distance of a clip to its neighbours (0 when every clip is at one point)."""
    points = points.detach().to(torch.float64)
    n = len(points)
    if n == 0:
        raise ValueError("a hypergraph needs at least one clip")
    squared = torch.cdist(points, points).square()
    k = min(neighbours, n - 1)
    ranked = squared.clone()
    ranked.fill_diagonal_(-1.0)  # every hyperedge holds its centre first
    # the k + 1 smallest of each row, ties to the lower index (a stable sort of the row: topk's tie order is not
    # specified); O(N^2 log N) at most, and AMYOptions.max_clips bounds N
    members = torch.sort(ranked, dim=1, stable=True).indices[:, : k + 1]
    distances = squared.gather(1, members)
    sigma2 = float(distances[:, 1:].mean()) if k > 0 else 0.0
    return members, distances, sigma2


def hypergraph(points: torch.Tensor, neighbours: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d) points -> the incidence matrix H (N vertices x N hyperedges) and the hyperedges' weights (N,), in
    float64. Hyperedge e holds clip e and its ``neighbours`` nearest clips (fewer when there are fewer clips),
    each with the probabilistic incidence of HGNN (Feng et al. AAAI 2019) ``H(v, e) = exp(-d(v, e)^2 / sigma^2)``
    (1 for the centre), sigma^2 the mean squared distance of a clip to its neighbours; a hyperedge's weight is the
    mean of its members' incidences. Every clip at one point: every incidence is 1."""
    return incidence_of(*neighbourhoods(points, neighbours))


def incidence_of(members: torch.Tensor, distances: torch.Tensor, sigma2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hypergraph` from :func:`neighbourhoods`' output."""
    n = len(members)
    kernel = torch.exp(-distances / (sigma2 if sigma2 > 0 else 1.0))  # (N, k + 1)
    incidence = torch.zeros(n, n, dtype=torch.float64)
    incidence[members, torch.arange(n)[:, None].expand_as(members)] = kernel
    return incidence, kernel.mean(dim=1)


def propagation_operator(incidence: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """HGNN's normalised operator ``D_v^-1/2 H W D_e^-1 H^T D_v^-1/2`` (N, N) for incidence H and hyperedge
    weights W; D_v the vertices' weighted degrees (``H W 1``), D_e the hyperedges' degrees (``H^T 1``)."""
    vertex_degree = incidence @ weights
    edge_degree = incidence.sum(dim=0)
    if bool((vertex_degree <= 0).any()) or bool((edge_degree <= 0).any()):
        raise ValueError("every clip must lie in a hyperedge of positive weight")
    scaled = vertex_degree.rsqrt()
    return scaled[:, None] * ((incidence * (weights / edge_degree)) @ incidence.T) * scaled[None, :]


def propagate(theta: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """Label propagation's closed form ``F = (1 - alpha)(I - alpha Theta)^-1 Y`` for (N, C) labels Y."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n = len(theta)
    system = torch.eye(n, dtype=torch.float64) - alpha * theta.to(torch.float64)
    return (1.0 - alpha) * torch.linalg.solve(system, labels.to(torch.float64))


def mean_entropy(distributions: torch.Tensor) -> float:
    """The mean Shannon entropy (nats) of the rows of ``distributions``."""
    p = distributions.clamp_min(0.0)
    return float(-(p * torch.log(p.clamp_min(1e-300))).sum(dim=1).mean())


def sharpened(distributions: torch.Tensor, entropy: float, iterations: int = 60) -> torch.Tensor:
    """The rows raised to one power 1 / T and renormalised, T chosen (by bisection on log T) so that their mean
    entropy is ``entropy``: each row's argmax and order kept, the confidence that of the labels they came from.
    Rows whose mean entropy is already at most ``entropy`` are returned as they are (T = 1 at most)."""
    if mean_entropy(distributions) <= entropy:
        return distributions
    logs = torch.log(distributions.clamp_min(1e-300))

    def at(log_t: float) -> torch.Tensor:
        return torch.softmax(logs / np.exp(log_t), dim=1)

    low, high = -12.0, 0.0  # T from e^-12 (the argmax alone) to 1 (unchanged)
    for _ in range(iterations):
        middle = (low + high) / 2
        if mean_entropy(at(middle)) > entropy:
            high = middle
        else:
            low = middle
    return at(low)


class UncertaintyBlock(torch.nn.Module):
    """AMY's UE block: a hypergraph convolution of each clip's input (its embedding and its label), read together
    with the clip's own input by a linear layer and a sigmoid: a reliability per clip."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.convolution = torch.nn.Linear(inputs, hidden, bias=False)
        self.estimator = torch.nn.Linear(hidden + inputs, 1)

    def forward(self, theta: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        features = torch.relu(theta @ self.convolution(inputs))  # HGNN: Theta X W1, the neighbourhood's
        return torch.sigmoid(self.estimator(torch.cat([features, inputs], dim=1)))[:, 0]


def uncertainty_loss(reliability: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, rank_share: float,
                     rank_margin: float) -> torch.Tensor:
    """The UE block's objective (Self-Cure Network's form): the cross-entropy of the reliability-scaled logits
    against each clip's label (a distribution or a class) plus the rank regularizer on the sorted reliabilities."""
    log_p = torch.log_softmax(reliability[:, None] * logits, dim=-1)
    if labels.dtype.is_floating_point:
        fit = -(labels * log_p).sum(dim=-1).mean()
    else:
        fit = torch.nn.functional.nll_loss(log_p, labels)
    ordered = torch.sort(reliability, descending=True).values
    high = max(1, min(len(ordered) - 1, int(round(rank_share * len(ordered)))))
    if len(ordered) < 2:
        return fit
    gap = ordered[:high].mean() - ordered[high:].mean()
    return fit + torch.clamp(rank_margin - gap, min=0.0)


class AMY(FedPer):
    """Each client refines its labels by propagation on a hypergraph of its clips, weighted by a personal
    uncertainty estimator; FedAvg's sharing (FedPer's with ``personal_layers``)."""

    name = "amy"
    title = "AMY (hypergraph label refinement)"
    Options = AMYOptions
    couples_records = True

    def __init__(self, options: AMYOptions | None = None) -> None:
        self.options = options or AMYOptions()
        super().__init__(max(1, self.options.personal_layers))
        self.one_global_model = self.options.personal_layers == 0  # type: ignore[misc]

    @classmethod
    def from_config(cls, config: FederationConfig, options: Any) -> "AMY":
        return cls(options)

    def personal_names(self, model: VFER) -> list[str]:
        return [] if self.options.personal_layers == 0 else super().personal_names(model)

    def check_client(self, records: int) -> None:
        if records > self.options.max_clips:
            raise ValueError(f"a training client holds {records} clips, more than federation.strategy_options."
                             f"max_clips = {self.options.max_clips} (its hypergraph takes memory N^2 and time N^3); "
                             "raise it or use another strategy")

    def predict(self, features: np.ndarray, actors: np.ndarray,
                scores: Callable[[int | None, np.ndarray], np.ndarray]) -> np.ndarray:
        if self.options.personal_layers == 0:
            return scores(None, features)
        return super().predict(features, actors, scores)

    def newcomer_head(self, heads: dict[int, dict[str, torch.Tensor]], weights: dict[int, int],
                      weighted_mean: Callable[[dict, dict], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        if self.options.personal_layers == 0:
            return None
        return super().newcomer_head(heads, weights, weighted_mean)

    def refine(self, points: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
               block_state: dict[str, torch.Tensor] | None, seed: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                dict[str, torch.Tensor]] | None:
        """(refined targets, reliabilities, the UE block's new state) for one client's clips; None where its clips
        give no neighbourhoods to refine on: at most ``neighbours + 1`` clips (every hyperedge would be the whole
        client, and propagation would hand every clip the majority's label) or an embedding that puts every clip
        at one point (a collapsed model). ValueError if the embedding or the logits are not finite."""
        o = self.options
        points = points.detach().to(torch.float64)
        logits = logits.detach().to(torch.float64)
        if not bool(torch.isfinite(points).all()) or not bool(torch.isfinite(logits).all()):
            raise ValueError("strategy 'amy': the received model's clip embeddings or logits are not finite")
        if len(points) <= o.neighbours + 1:
            return None
        magnitude = float(points.square().sum(dim=1).mean())
        points = points - points.mean(dim=0)
        spread = float(points.square().sum(dim=1).mean())
        if spread <= 1e-20 * magnitude or spread == 0.0:  # every clip at one point (to rounding): a collapsed model
            return None
        members, distances, sigma2 = neighbourhoods(points, o.neighbours)
        if sigma2 <= 0.0:  # every clip's neighbours are its exact duplicates: measure distances by the overall spread
            sigma2 = spread
        incidence, weights = incidence_of(members, distances, sigma2)
        theta = propagation_operator(incidence, weights)
        floating = targets.dtype.is_floating_point
        labels = targets.to(torch.float64) if floating else \
            torch.nn.functional.one_hot(targets, NUM_CLASSES).to(torch.float64)
        # the block reads the centred embeddings at unit root-mean-square, whatever the space's scale (sigma2 > 0
        # above, so the points are not all at one place)
        inputs = torch.cat([points / points.square().mean().sqrt(), labels], dim=1)
        with torch.random.fork_rng(devices=[]):  # the block's first initialisation: reproducible, apart from the run's
            torch.manual_seed(seed)
            block = UncertaintyBlock(inputs.shape[1], o.ue_hidden).to(torch.float64)
        if block_state is not None and all(block_state[k].shape == v.shape for k, v in block.state_dict().items()):
            block.load_state_dict(block_state)
        optimizer = torch.optim.Adam(block.parameters(), lr=o.ue_lr)
        # a class label is fitted smoothed (Szegedy et al. 2016), so that the best reliability of a clip whose label
        # the model believes is finite: against a one-hot target it grows without bound, the sigmoid saturates
        # and no gradient is left to single out the disbelieved clips
        fitted = labels if floating else (1.0 - SMOOTHING) * labels + SMOOTHING / NUM_CLASSES
        for _ in range(o.ue_steps):
            optimizer.zero_grad()
            loss = uncertainty_loss(block(theta, inputs), logits, fitted, o.rank_share, o.rank_margin)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            reliability = block(theta, inputs)
        spread = propagate(theta, reliability[:, None] * labels, o.alpha)
        mass = spread.sum(dim=1, keepdim=True)
        refined = torch.where(mass > 1e-12, spread / mass.clamp_min(1e-12), labels)
        if floating and o.sharpen:
            refined = sharpened(refined, mean_entropy(labels))
        if o.blend:  # a clip keeps its own label as far as the block trusts it
            refined = reliability[:, None] * labels + (1.0 - reliability[:, None]) * refined
        new_targets = refined.to(targets.dtype) if floating else refined.argmax(dim=1).to(targets.dtype)
        state = {k: v.detach().clone() for k, v in block.state_dict().items()}
        return new_targets, reliability.to(torch.float32).clamp(0.0, 1.0), state

    def client_data(self, phase: str, client_id: int, features: torch.Tensor, targets: torch.Tensor,
                    model: Callable[[], VFER], state: Any, *, round_index: int = 0) -> tuple[ClientData | None, Any]:
        if phase != TRAINING or round_index < self.options.warmup or len(targets) <= self.options.neighbours + 1:
            return None, state  # too few clips for neighbourhoods (refine's own bound): no forward pass for nothing
        received = model().eval()
        with torch.no_grad():
            embedding, logits = received.embed_and_classify(features)
        points = logits if self.options.space == "logits" else embedding
        block_state = state.get("ue") if isinstance(state, dict) else None
        out = self.refine(points, logits, targets, block_state, seed=client_id)
        if out is None:
            return None, state
        refined, reliability, block_state = out
        weights = reliability if self.options.weighting else None
        return ClientData(refined, weights), {"ue": block_state}


__all__ = ["AMY"]
