"""Distributed DP inside secure aggregation: exact integer sums, the noise's distribution, the clients' refusal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from conftest import chi_square_p
from privfer.config import AggregationConfig
from privfer.errors import ConfigError
from privfer.fl.aggregation import sum_integer_contributions
from privfer.models.vfer import VFER
from privfer.models.clipped_sums import clipped_gradient_sums
from privfer.privacy.noise import noise_family
from privfer.privacy.distributed import (
    calibrate_distributed,
    decode_sum,
    encode_contribution,
    noise_generator,
    randomized_round,
    sensitivities,
)
from privfer.models.loss import LabelLoss
from privfer.secagg import RoundAborted, SecAggClient, SecAggServer, aggregate, make_config
from privfer.secagg.messages import ForwardedShares, KeyRoster, UnmaskRequest
from privfer.secagg.payload import PayloadLayout

SKELLAM = noise_family("skellam")


def _plan(clients=6, dimension=400, epsilon=4.0, **extra):
    settings = dict(epsilon=epsilon, delta=1e-5, max_grad_norm=1.0, dimension=dimension, sample_rate=1.0, steps=5,
                    clients=clients, records=200, min_inputs_fraction=0.8, colluding_fraction=0.2,
                    rounding_overhead=0.05, modulus_bits=32, max_noise_multiplier=50.0)
    settings.update(extra)
    return calibrate_distributed(**settings)


def test_masking_and_plain_give_bit_identical_integer_sums():
    plan = _plan()
    rng = np.random.default_rng(1)
    contributions = {c: encode_contribution(rng.normal(0, 2, plan.dimension), plan, noise_generator())
                     for c in range(1, 7)}
    for dropouts in ({}, {3: "masked_input"}, {5: "unmask"}):
        masked = sum_integer_contributions(contributions, dropouts, AggregationConfig(graph="complete"), plan,
                                           round_id=f"r{len(dropouts)}")
        plain = sum_integer_contributions(contributions, dropouts, AggregationConfig(backend="plain"), plan,
                                          round_id="p")
        assert masked.aborted is None and masked.included == plain.included
        assert masked.total.dtype == np.int64 and np.array_equal(masked.total, plain.total)
        expected = np.sum([contributions[c] for c in masked.included], axis=0)
        assert np.array_equal(masked.total, expected)


def test_the_unmasked_noise_has_the_claimed_skellam_distribution():
    # Zero gradients: what the server unmasks is the sum of the clients' noise shares, which must be
    # Skellam(clients x share variance) exactly. Many rounds through the real masking protocol.
    plan = _plan(clients=5, dimension=3000, epsilon=40.0, rounding_overhead=1.0, max_grad_norm=0.05)
    assert plan.share_variance < 5000  # a small variance keeps the pmf's support short for the test
    samples = []
    for round_index in range(4):
        contributions = {c: encode_contribution(np.zeros(plan.dimension), plan, noise_generator())
                         for c in range(1, 6)}
        summed = sum_integer_contributions(contributions, {}, AggregationConfig(), plan, round_id=f"n{round_index}")
        samples.append(summed.total)
    values = np.concatenate(samples)
    variance = 5 * plan.share_variance
    assert values.mean() == pytest.approx(0.0, abs=5 * math.sqrt(variance / values.size))
    # the sample variance of n draws has standard error about variance x sqrt(2 / n)
    assert values.var() == pytest.approx(variance, rel=5 * math.sqrt(2 / values.size))
    # chi-square goodness of fit against the exact Skellam pmf, bins with >= 20 expected draws
    support = np.arange(values.min(), values.max() + 1)
    p = chi_square_p(values, support, stats.skellam.pmf(support, variance / 2, variance / 2))
    assert p > 1e-4


def test_noise_shares_come_from_independent_keyed_generators():
    a, b = noise_generator(), noise_generator()
    assert not np.array_equal(SKELLAM.sample(a, 1e6, 100), SKELLAM.sample(b, 1e6, 100))
    key = bytes(range(32))
    assert np.array_equal(SKELLAM.sample(noise_generator(key), 1e6, 100), SKELLAM.sample(noise_generator(key), 1e6, 100))
    with pytest.raises(ValueError):
        noise_generator(b"short")


def _round(config, n=5):
    layout = PayloadLayout(((8,),), config)
    server = SecAggServer(config, "r", layout)
    clients = {c: SecAggClient(c, config, "r", layout) for c in range(1, n + 1)}
    for cid, c in clients.items():
        server.receive_advertise(c.advertise_keys().to_bytes(), peer=cid)
    roster = server.key_roster().to_bytes()
    for cid, c in clients.items():
        server.receive_share_keys(c.share_keys(KeyRoster.from_bytes(roster)).to_bytes(), peer=cid)
    return server, clients, {cid: b.to_bytes() for cid, b in server.forward_shares().items()}


def test_clients_refuse_to_unmask_below_the_minimum_inputs():
    strict = make_config(num_clients=5, graph="complete", encoding="integer", integer_sum_bound=10**6, min_inputs=5)
    # A server that does not check the minimum (its own config lacks it) asks to unmask 4 of 5 inputs.
    lax = strict.model_copy(update={"min_inputs": None})
    server, clients, bundles = _round(strict)
    server.config = lax
    for cid in (1, 2, 3, 4):
        server.receive_masked_input(clients[cid].masked_input(
            ForwardedShares.from_bytes(bundles[cid]), [np.arange(8, dtype=np.int64)]).to_bytes(), peer=cid)
    request = UnmaskRequest.from_bytes(server.unmask_request().to_bytes())
    assert request.survivors == (1, 2, 3, 4)
    for cid in (1, 2, 3, 4):
        with pytest.raises(RoundAborted, match="minimum"):
            clients[cid].unmask(request)
    # the honest server refuses the same round itself
    honest, _, _ = _round(strict)
    with pytest.raises(RoundAborted):
        honest.unmask_request()


def test_a_round_below_the_minimum_releases_nothing():
    plan = _plan(clients=6)
    contributions = {c: np.zeros(plan.dimension, dtype=np.int64) for c in range(1, 7)}
    dropouts = {1: "masked_input", 2: "share_keys"}  # 4 of 6 inputs; the minimum is ceil(0.8 x 6) = 5
    summed = sum_integer_contributions(contributions, dropouts, AggregationConfig(graph="complete"), plan,
                                       round_id="few")
    assert summed.aborted is not None and summed.included == [] and summed.total.size == 0
    plain = sum_integer_contributions(contributions, dropouts, AggregationConfig(backend="plain"), plan,
                                      round_id="few")
    assert plain.aborted is not None and plain.included == [] and plain.total.size == 0


def test_every_backend_is_one_call_with_one_result_type():
    from privfer.secagg.plain import PlainConfig
    from privfer.secagg.rounds import AggregationResult

    updates = {c: [np.full(3, float(c)), np.arange(2.0) * c] for c in range(1, 7)}
    dropouts = {2: "masked_input", 4: "unmask"}  # 2 excluded, 4 included
    results = {}
    for backend in ("masking", "ckks", "plain"):
        config = AggregationConfig(backend=backend, graph="complete").round_config(6, metrics=("loss",))
        results[backend] = aggregate(updates, config, dropouts, example_counts={c: 10 * c for c in updates},
                                     metrics={c: {"loss": 0.5} for c in updates}, round_id="one-call")
    for backend, result in results.items():
        assert isinstance(result, AggregationResult), backend
        assert result.included == [1, 3, 4, 5, 6] and result.example_count == 190, backend
        assert result.metrics["loss"] == pytest.approx(2.5, abs=1e-4), backend
        np.testing.assert_allclose(result.total[0], np.full(3, 19.0), atol=1e-4)
        np.testing.assert_allclose(result.total[1], np.arange(2.0) * 19, atol=1e-4)
    assert results["masking"].transcript is not None and results["plain"].transcript is None
    with pytest.raises(RoundAborted):
        aggregate(updates, PlainConfig(num_clients=6, min_inputs=6), dropouts)
    with pytest.raises(TypeError):
        aggregate(updates, object())
    with pytest.raises(ConfigError, match="ckks"):
        AggregationConfig(backend="ckks").round_config(4, integer_sum_bound=100, min_inputs=3)


def test_integer_encoding_refuses_floats_and_out_of_bound_values():
    config = make_config(num_clients=3, encoding="integer", integer_sum_bound=100)
    layout = PayloadLayout(((4,),), config)
    from privfer.secagg import InvalidUpdate

    with pytest.raises(InvalidUpdate, match="integer"):
        layout.encode([np.zeros(4)])
    with pytest.raises(InvalidUpdate, match="exceeds the bound 100"):
        layout.encode([np.array([0, 0, 0, 101])])
    with pytest.raises(Exception, match="integer_sum_bound"):
        make_config(num_clients=3, encoding="integer")
    with pytest.raises(Exception, match="modulus_bits=64"):
        make_config(num_clients=3, encoding="integer", integer_sum_bound=2**40)
    result = aggregate({1: [np.array([1, -2, 3, 100])], 2: [np.array([-1, 2, -3, -100])], 3: [np.zeros(4, int)]},
                       config)
    assert np.array_equal(result.total[0], np.zeros(4)) and layout.length == 4


def test_decode_refuses_a_sum_beyond_the_plan():
    plan = _plan()
    with pytest.raises(ValueError, match="bound"):
        decode_sum(np.array([plan.sum_bound + 1]), plan)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-3, 3, allow_nan=False), min_size=5, max_size=5),
    st.lists(st.floats(-1, 1, allow_nan=False), min_size=5, max_size=5),
    st.integers(0, 2**32 - 1),
)
def test_one_records_rounded_contribution_stays_within_the_stated_sensitivity(others, record, seed):
    # Coupled on the same rounding uniforms, adding one record (||g|| <= C) moves the rounded sum by an
    # integer vector within l2 = C scale + sqrt(d) and l1 = min(sqrt(d) l2, l2^2) (protocols/secagg/SPEC.md).
    scale, clip = 8.0, 1.0
    g = np.array(record)
    norm = np.linalg.norm(g)
    if norm > clip:
        g = g * clip / norm
    x = np.array(others)
    with_record = randomized_round((x + g) * scale, np.random.default_rng(seed))
    without = randomized_round(x * scale, np.random.default_rng(seed))
    v = with_record - without
    l1, l2 = sensitivities(clip, scale, x.size)
    assert np.linalg.norm(v) <= l2 + 1e-9 and np.abs(v).sum() <= l1 + 1e-9


@pytest.mark.parametrize("shortcut,readout", [(False, "last"), (True, "last"), (True, "both")])
def test_batched_clipped_sums_equal_per_client_and_opacus(shortcut, readout):
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = VFER(12, 8, fast_dp=True, shortcut=shortcut, readout=readout)
    if shortcut:  # away from its zero initialisation, so it shapes every other layer's gradient too
        torch.nn.init.normal_(model.shortcut.weight)
    x, y = torch.randn(30, 4, 12), torch.softmax(torch.randn(30, 6), -1)
    groups = torch.randint(0, 3, (30,))
    batched = clipped_gradient_sums(model, x, y, groups, 3, 0.3, chunk=7).sums
    for k in range(3):
        alone = clipped_gradient_sums(model, x[groups == k], y[groups == k], torch.zeros(int((groups == k).sum()),
                                      dtype=torch.long), 1, 0.3).sums
        for name in batched:
            torch.testing.assert_close(batched[name][k], alone[name][0], rtol=1e-5, atol=1e-7)
    reference = GradSampleModule(VFER(12, 8, fast_dp=True, shortcut=shortcut, readout=readout), batch_first=True,
                                 loss_reduction="sum")
    reference._module.load_state_dict(model.state_dict())
    LabelLoss("sum")(reference(x), y).backward()
    per_sample = {n: p.grad_sample for n, p in reference._module.named_parameters()}
    norms = torch.sqrt(sum((p.reshape(30, -1) ** 2).sum(1) for p in per_sample.values()))
    factors = (0.3 / (norms + 1e-6)).clamp(max=1.0)
    for name, p in per_sample.items():
        for k in range(3):
            chosen = groups == k
            expected = (factors[chosen].view(-1, *[1] * (p.dim() - 1)) * p[chosen]).sum(0).double()
            torch.testing.assert_close(batched[name][k], expected, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # the model's own gradients are untouched


def test_a_new_layer_type_is_one_registration_for_the_clipped_sums():
    """A layer type the batched sums do not know is refused by name; registering its factors (beside where an
    Opacus grad sampler would be) is all it takes, and the sums equal per-example autograd's, clipped."""
    from privfer.models import clipped_sums

    class Scaled(torch.nn.Module):  # y = 2 (x W^T + b): a linear map the registry does not know
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 5))
            self.bias = torch.nn.Parameter(torch.randn(3))

        def forward(self, x):
            return 2 * torch.nn.functional.linear(x, self.weight, self.bias)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Scaled()
            self.head = torch.nn.Linear(3, 6)

        def forward(self, x):
            return self.head(torch.tanh(self.inner(x)))

    torch.manual_seed(1)
    model = Model()
    x, y, groups = torch.randn(9, 5), torch.softmax(torch.randn(9, 6), -1), torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 0])
    with pytest.raises(TypeError, match="register_clipped_sum"):
        clipped_gradient_sums(model, x, y, groups, 2, 0.5)
    try:
        @clipped_sums.register_clipped_sum(Scaled)
        def _factors(module, inputs, grad):  # d(2 x W^T)/dW = 2 g x^T: the factor 2 goes with the gradient
            return (2 * grad).unsqueeze(1), inputs.unsqueeze(1)

        sums = clipped_gradient_sums(model, x, y, groups, 2, 0.5).sums
    finally:
        del clipped_sums.RULES[Scaled]
    expected = {name: torch.zeros(2, *p.shape, dtype=torch.float64) for name, p in model.named_parameters()}
    for i in range(len(x)):
        grads = torch.autograd.grad(LabelLoss("sum")(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, 0.5 / (float(norm) + 1e-6))
        for (name, _), g in zip(model.named_parameters(), grads):
            expected[name][int(groups[i])] += factor * g.double()
    for name in expected:
        torch.testing.assert_close(sums[name], expected[name], rtol=1e-5, atol=1e-7)
