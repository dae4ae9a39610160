"""AMY (hypergraph label refinement, issue 27): its hypergraph and propagation, its refinement of a planted noisy
clip, its refusal under record-level DP, and its personal uncertainty block, which no message ever carries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import small_config, spy_on_aggregate

from privfer.errors import ConfigError
from privfer.fl.rounds import TRAINING
from privfer.fl.simulation import prepare_federation, simulate
from privfer.fl.strategies import make_strategy
from privfer.fl.strategies.amy import AMY, AMYOptions, hypergraph, propagate, propagation_operator, uncertainty_loss
from privfer.models.vfer import VFER


def test_the_hypergraph_and_its_propagation_match_a_hand_computed_example():
    # four clips on a line at 0, 1, 3 and 7, one neighbour each: hyperedges {0,1}, {1,0}, {2,1}, {3,2}
    incidence, weights = hypergraph(torch.tensor([[0.0], [1.0], [3.0], [7.0]]), neighbours=1)
    sigma2 = (1 + 1 + 4 + 16) / 4  # the mean squared distance of each clip to its neighbour
    k1, k4, k16 = (math.exp(-d / sigma2) for d in (1, 4, 16))
    by_hand_h = [[1, k1, 0, 0], [k1, 1, k4, 0], [0, 0, 1, k16], [0, 0, 0, 1]]  # H(v, e): the kernel, 1 at the centre
    assert np.allclose(incidence.numpy(), by_hand_h, rtol=1e-12, atol=0)
    w = [(1 + k1) / 2, (1 + k1) / 2, (1 + k4) / 2, (1 + k16) / 2]  # each hyperedge's mean incidence
    assert weights.tolist() == pytest.approx(w, rel=1e-12)
    theta = propagation_operator(incidence, weights)
    # Theta[u, v] = sum over e of H(u, e) H(v, e) w_e / d(e) / sqrt(d(u) d(v)), d(e) = sum of H(., e), d(v) = sum of
    # H(v, .) w
    h = np.array(by_hand_h)
    edge_degree = h.sum(axis=0)
    degree = [sum(h[v, e] * w[e] for e in range(4)) for v in range(4)]
    by_hand = np.zeros((4, 4))
    for u in range(4):
        for v in range(4):
            by_hand[u, v] = sum(h[u, e] * h[v, e] * w[e] / edge_degree[e] for e in range(4)) / math.sqrt(
                degree[u] * degree[v])
    assert np.allclose(theta.numpy(), by_hand, rtol=1e-12, atol=0)
    # F = (1 - alpha)(I - alpha Theta)^-1 Y, against its power series
    labels = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], dtype=torch.float64)
    alpha = 0.6
    series = np.zeros((4, 3))
    term = labels.numpy()
    for _ in range(400):
        series += term
        term = alpha * by_hand @ term
    assert np.allclose(propagate(theta, labels, alpha).numpy(), (1 - alpha) * series, rtol=1e-10, atol=1e-12)


def test_hypergraphs_of_few_clips_and_of_identical_clips_are_well_defined():
    incidence, weights = hypergraph(torch.zeros(3, 2), neighbours=8)  # fewer clips than neighbours, all at one point
    assert incidence.tolist() == [[1, 1, 1]] * 3 and weights.tolist() == [1.0, 1.0, 1.0]
    theta = propagation_operator(incidence, weights)
    assert torch.allclose(theta, torch.full((3, 3), 1 / 3, dtype=torch.float64))
    one, weight = hypergraph(torch.ones(1, 4), neighbours=5)
    assert one.tolist() == [[1.0]] and weight.tolist() == [1.0]
    with pytest.raises(ValueError, match="alpha"):
        propagate(theta, torch.eye(3), 1.0)


def test_clips_without_neighbourhoods_keep_their_labels_and_a_non_finite_model_is_an_error():
    strategy = AMY(AMYOptions(neighbours=5))
    labels = torch.tensor([0, 0, 0, 1, 1, 2])  # six clips: every hyperedge would be the whole client
    points = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1], [20.0]])
    logits = 4.0 * torch.nn.functional.one_hot(labels, 6).double()  # a model that agrees with every label
    assert strategy.refine(points, logits, labels, None, seed=0) is None  # ... so nothing is refined
    many = torch.arange(40) % 6
    collapsed = torch.ones(40, 8)  # a model whose embedding puts every clip at one point
    logits = torch.nn.functional.one_hot(many, 6).double()
    assert strategy.refine(collapsed, logits, many, None, seed=0) is None
    duplicates = torch.cat([torch.zeros(20, 8), torch.full((20, 8), 5.0)])  # two clusters of exact duplicates
    two = torch.cat([torch.zeros(20, dtype=torch.long), torch.full((20,), 3)])
    refined, _, _ = strategy.refine(duplicates, 4.0 * torch.nn.functional.one_hot(two, 6).double(), two, None, 0)
    assert refined.tolist() == two.tolist()  # refined (not skipped), each cluster keeping its label
    broken = torch.randn(40, 8)
    broken[3, 1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        strategy.refine(broken, logits, many, None, seed=0)


def test_well_separated_correct_labels_survive_refinement():
    generator = torch.Generator().manual_seed(1)
    sizes = [15, 10, 8, 4, 2, 1]  # one client, six classes, the last ones rare
    classes = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    centres = 10.0 * torch.eye(6)
    points = centres[classes] + 0.3 * torch.randn(len(classes), 6, generator=generator)
    logits = 4.0 * torch.nn.functional.one_hot(classes, 6).double()
    refined, _, _ = AMY(AMYOptions()).refine(points, logits, classes, None, seed=0)
    assert refined.tolist() == classes.tolist()


def _planted(noisy_index=2):
    """Two tight clusters of six clips (class 0 around +3, class 2 around -3), one clip of the first labelled 1,
    and logits that believe each cluster's class."""
    generator = torch.Generator().manual_seed(0)
    points = torch.cat([3 + 0.1 * torch.randn(6, 4, generator=generator),
                        -3 + 0.1 * torch.randn(6, 4, generator=generator)])
    classes = torch.tensor([0] * 6 + [2] * 6)
    logits = 4.0 * torch.nn.functional.one_hot(classes, 6).double()
    labels = classes.clone()
    labels[noisy_index] = 1
    votes = torch.nn.functional.one_hot(labels, 6).float() * 0.7 + 0.3 / 6
    return points, logits, labels, votes, classes


@pytest.mark.parametrize("discrete", [False, True])
def test_a_planted_noisy_clip_takes_its_neighbours_label_and_the_others_keep_theirs(discrete):
    points, logits, labels, votes, classes = _planted()
    targets = labels if discrete else votes

    def argmax(refined):
        return (refined if discrete else refined.argmax(dim=1)).tolist()

    # at alpha 0.5 propagation alone keeps the planted label (an untrained block trusts every clip alike) ...
    untrained, _, _ = AMY(AMYOptions(neighbours=4, alpha=0.5, ue_steps=0)).refine(points, logits, targets, None, 1)
    assert argmax(untrained) == labels.tolist()
    # ... and the trained uncertainty block's reliabilities are what relabel it
    strategy = AMY(AMYOptions(neighbours=4, alpha=0.5, ue_steps=200))
    generator = torch.get_rng_state()
    refined, reliability, state = strategy.refine(points, logits, targets, None, seed=1)
    assert torch.equal(torch.get_rng_state(), generator)  # the block's initialisation draws apart from the run's
    assert refined.dtype == targets.dtype and refined.shape == targets.shape
    assert argmax(refined) == classes.tolist()  # the planted clip is relabelled, the rest keep their labels
    assert float(reliability[2]) < float(reliability[[0, 1, 3, 4, 5]].min())  # and it is the least reliable
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    if not discrete:
        assert torch.allclose(refined.sum(dim=1), torch.ones(12))


def test_the_uncertainty_loss_rewards_reliability_where_the_model_believes_the_label():
    logits = torch.tensor([[5.0, 0, 0, 0, 0, 0], [5.0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    low_on_wrong = uncertainty_loss(torch.tensor([0.9, 0.1], dtype=torch.float64), logits, labels, 0.5, 0.0)
    high_on_wrong = uncertainty_loss(torch.tensor([0.9, 0.9], dtype=torch.float64), logits, labels, 0.5, 0.0)
    assert low_on_wrong < high_on_wrong
    # the rank regularizer: a gap below the margin costs the shortfall
    flat = uncertainty_loss(torch.tensor([0.5, 0.5], dtype=torch.float64), torch.zeros(2, 6, dtype=torch.float64),
                            labels, 0.5, 0.2)
    assert float(flat) == pytest.approx(math.log(6) + 0.2)


def test_clients_train_on_their_own_labels_during_warmup_and_outside_training():
    strategy = AMY(AMYOptions(warmup=3))
    generator = torch.Generator().manual_seed(0)
    features, targets = torch.randn(12, 4, 8, generator=generator), torch.softmax(torch.randn(12, 6), -1)

    def model():
        raise AssertionError("no model is needed before the warmup ends")

    assert strategy.client_data(TRAINING, 1, features, targets, model, None, round_index=2) == (None, None)
    assert strategy.client_data("adaptation", 1, features, targets, model, None, round_index=50) == (None, None)
    torch.manual_seed(0)
    vfer = VFER(8, 6, readout="both")
    data, state = strategy.client_data(TRAINING, 1, features, targets, lambda: vfer, None, round_index=3)
    assert data is not None and data.weights is not None and set(state) == {"ue"}
    # the block kept in the state is where the next round's training starts
    warm, _ = strategy.client_data(TRAINING, 1, features, targets, lambda: vfer, state, round_index=4)
    cold, _ = strategy.client_data(TRAINING, 1, features, targets, lambda: vfer, None, round_index=4)
    assert not torch.allclose(warm.weights, cold.weights)
    assert torch.allclose(cold.weights, data.weights)  # the same start, the same steps
    unweighted, _ = AMY(AMYOptions(warmup=0, weighting=False)).client_data(TRAINING, 1, features, targets,
                                                                           lambda: vfer, None)
    assert unweighted.weights is None and torch.allclose(unweighted.targets, data.targets)


def test_the_hypergraph_is_built_where_space_says(monkeypatch):
    seen = []
    real = AMY.refine

    def spy(self, points, *args, **kwargs):
        seen.append(points.shape[1])
        return real(self, points, *args, **kwargs)

    monkeypatch.setattr(AMY, "refine", spy)
    features, targets = torch.randn(12, 4, 8), torch.softmax(torch.randn(12, 6), -1)
    vfer = VFER(8, 5, readout="both")
    for space in ("embedding", "logits"):
        AMY(AMYOptions(warmup=0, space=space)).client_data(TRAINING, 1, features, targets, lambda: vfer, None)
    assert seen == [10, 6]  # the embedding (both readouts of 5 units), then the six logits


def test_options_are_checked_and_named():
    config = small_config("federation.strategy=amy", "federation.strategy_options.alpha=1.5")
    with pytest.raises(ConfigError, match="alpha"):
        make_strategy(config.federation)
    config = small_config("federation.strategy=amy", "federation.strategy_options.hops=2")
    with pytest.raises(ConfigError, match="hops"):
        make_strategy(config.federation)


BASE = ["federation.rounds=3", "federation.adaptation=false", "federation.strategy=amy",
        "federation.strategy_options.warmup=1"]


@pytest.mark.parametrize("overrides", [
    ["privacy.epsilon=6"],  # record level, distributed
    ["privacy.epsilon=6", "privacy.mechanism=local", "aggregation.backend=plain"],  # record level, local
])
def test_record_level_dp_is_refused_with_the_reason(small_clips, overrides):
    with pytest.raises(ConfigError, match="federation.strategy 'amy'.*other clips.*record-level DP"):
        prepare_federation(small_config(*BASE, *overrides), small_clips)


def test_personal_layers_are_refused_at_person_level_on_the_distributed_line(small_clips):
    config = small_config(*BASE, "privacy.epsilon=6", "privacy.unit=person",
                          "federation.strategy_options.personal_layers=1")
    with pytest.raises(ConfigError, match="personal layers"):
        prepare_federation(config, small_clips)


def test_the_uncertainty_block_never_enters_any_message(monkeypatch, small_clips, tmp_path):
    config = small_config(*BASE, "privacy.epsilon=6", "privacy.unit=person", "model.hidden_size=8",
                          "output.save_model=true")
    seen = spy_on_aggregate(monkeypatch)
    blocks: list[dict[str, torch.Tensor]] = []
    original = AMY.refine

    def keeping(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out is not None:
            blocks.append(out[2])
        return out

    monkeypatch.setattr(AMY, "refine", keeping)
    federation = prepare_federation(config, small_clips)
    template = VFER.from_config(config.model, small_clips.feature_dim, private=True)
    model_size = sum(p.numel() for p in template.parameters())
    assert federation.strategy.shared_names(template) == [n for n, _ in template.named_parameters()]
    simulate(config, tmp_path / "run", clips=small_clips)
    assert blocks  # the blocks ran (rounds after the warmup) ...
    integer_messages = [a for a in seen if a.dtype.kind in "iu"]
    assert integer_messages
    # ... every masked contribution is the model's update and nothing else (its coordinates, the example count) ...
    assert {a.size for a in integer_messages} <= {model_size, model_size + 1}
    # ... and nothing the run leaves behind holds a block (the checkpoint that kept them is gone)
    names = [name.encode() for name in blocks[0]]
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not any(name in content for name in names), path
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert not saved["personal"] and set(saved["global"]) == set(template.state_dict())


def test_refinement_starts_when_the_runs_warmup_ends(monkeypatch, small_clips):
    calls: list[tuple[int, bool]] = []
    real_data, real_refine = AMY.client_data, AMY.refine
    refining = []

    def refine(self, *args, **kwargs):
        out = real_refine(self, *args, **kwargs)
        if out is not None:  # a refinement made, not only tried
            refining.append(1)
        return out

    def client_data(self, *args, round_index=0, **kwargs):
        before = len(refining)
        out = real_data(self, *args, round_index=round_index, **kwargs)
        calls.append((round_index, len(refining) > before))
        return out

    monkeypatch.setattr(AMY, "refine", refine)
    monkeypatch.setattr(AMY, "client_data", client_data)
    config = small_config("federation.rounds=3", "federation.adaptation=false", "federation.strategy=amy",
                          "federation.strategy_options.warmup=2", "aggregation.backend=plain",
                          "federation.clients_per_round=4")
    simulate(config, None, clips=small_clips)
    assert sorted({r for r, _ in calls}) == [0, 1, 2]
    assert all(refined == (r >= 2) for r, refined in calls)  # every client refines from the third round on


def test_what_amy_cannot_serve_is_refused_before_the_run(small_clips):
    config = small_config(*BASE, "federation.strategy_options.max_clips=5", "aggregation.backend=plain")
    with pytest.raises(ConfigError, match="max_clips = 5"):
        prepare_federation(config, small_clips)
    config = small_config(*BASE, "federation.strategy_options.personal_layers=9", "aggregation.backend=plain")
    with pytest.raises(ConfigError, match="personal_layers must be between"):
        prepare_federation(config, small_clips)
