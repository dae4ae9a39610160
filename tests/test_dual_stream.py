"""The dual-stream model (RDFER's synopsis and detail streams, model.architecture dual_stream): its fast clipped
sums are Opacus's per-sample gradients clipped and summed, each clip's output is its own, the key segment is where
the clip's expression is, and it trains in a federation."""

from __future__ import annotations

import pytest
import torch

from privfer.config import load_config
from privfer.errors import ConfigError
from privfer.models.clipped_sums import clipped_gradient_sums
from privfer.models.loss import LabelLoss
from privfer.models.vfer import VFER, DualStreamVFER

from conftest import small_config


def dual(seed: int = 0, **options) -> DualStreamVFER:
    torch.manual_seed(seed)
    model = DualStreamVFER(12, 8, fast_dp=True, key_frames=3, **options)
    torch.nn.init.normal_(model.key_scorer.weight, std=0.5)  # away from zero: the scorer shapes the segment and gate
    if model.shortcut is not None:
        torch.nn.init.normal_(model.shortcut.weight)
    return model


@pytest.mark.parametrize("readout,shortcut,layers", [("last", False, 1), ("both", True, 1), ("mean", False, 2)])
def test_fast_clipped_sums_equal_opacus_per_sample_gradients_clipped_and_summed(readout, shortcut, layers):
    from opacus import GradSampleModule

    model = dual(readout=readout, shortcut=shortcut, num_layers=layers)
    x, y = torch.randn(30, 7, 12), torch.softmax(torch.randn(30, 6), -1)
    groups = torch.randint(0, 3, (30,))
    sums = clipped_gradient_sums(model, x, y, groups, 3, 0.3, chunk=7)
    reference = GradSampleModule(dual(readout=readout, shortcut=shortcut, num_layers=layers), batch_first=True,
                                 loss_reduction="sum")
    reference._module.load_state_dict(model.state_dict())
    LabelLoss("sum")(reference(x), y).backward()
    per_sample = {n: p.grad_sample for n, p in reference._module.named_parameters()}
    assert set(per_sample) == set(sums.sums) and any(n.startswith("detail.") for n in per_sample)
    assert per_sample["key_scorer.weight"].abs().amax(dim=(1, 2)).min() > 0  # every clip's gradient reaches it
    norms = torch.sqrt(sum((p.reshape(30, -1) ** 2).sum(1) for p in per_sample.values()))
    factors = (0.3 / (norms + 1e-6)).clamp(max=1.0)
    assert sums.clipped == int((norms > 0.3).sum()) > 0
    for name, p in per_sample.items():
        for k in range(3):
            chosen = groups == k
            expected = (factors[chosen].view(-1, *[1] * (p.dim() - 1)) * p[chosen]).sum(0).double()
            torch.testing.assert_close(sums.sums[name][k], expected, rtol=1e-4, atol=1e-6)


def test_each_clips_output_depends_on_that_clip_alone():
    """Record-level DP needs a record's contribution to be a function of the record: the key segment, the gate and
    the embedding of a clip do not move when the rest of its batch changes."""
    model = dual()
    x = torch.randn(10, 7, 12)
    others = torch.randn(10, 7, 12)
    others[3] = x[3]
    torch.testing.assert_close(model(x)[3], model(others)[3])
    torch.testing.assert_close(model(x)[3:4], model(x[3:4]))
    assert torch.equal(model.key_segment(x)[0][3], model.key_segment(others)[0][3])


def test_the_key_segment_is_where_the_expression_is_and_the_scorer_moves_it():
    torch.manual_seed(1)
    model = DualStreamVFER(4, 8, key_frames=3)
    clips = torch.zeros(2, 10, 4) + torch.randn(2, 1, 4)  # a still face ...
    clips[0, 5:8] += torch.tensor([3.0, 0.0, 0.0, 0.0])  # ... whose expression peaks at frames 5-7
    clips[1, 1:4] += torch.tensor([3.0, 0.0, 0.0, 0.0])  # ... at frames 1-3
    start, scores = model.key_segment(clips)
    assert start.tolist() == [5, 1] and torch.equal(scores, torch.zeros(2, 10))  # the untrained scorer: the apex
    assert model.segment_length(10) == 3 and model.segment_length(2) == 2
    assert DualStreamVFER(4, 8).segment_length(16) == 8 and DualStreamVFER(4, 8).segment_length(3) == 2
    with torch.no_grad():  # a scorer that learned to prefer frames with feature 1 high
        model.key_scorer.weight[0, 1] = 5.0
    clips[0, 0:3, 1] += 1.0
    assert model.key_segment(clips)[0].tolist() == [0, 1]


def test_the_model_groups_its_layers_and_the_stacked_trainer_refuses_it():
    from privfer.fl.batched import batchable
    from privfer.fl.client import LocalTraining

    model = DualStreamVFER(12, 8, shortcut=True)
    names = [name for _, group in model.layer_groups() for name in group]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert [g for g, _ in model.layer_groups()] == ["shortcut", "key scorer", "lstm layer 0", "head"]
    assert model.personal_parameter_names(1) == ["head.weight", "head.bias"]
    deep = DualStreamVFER(12, 8, num_layers=2)  # FedPer's last two layers: the head and both streams' top layers
    assert sorted(deep.personal_parameter_names(2)) == sorted(
        [f"{stream}.{kind}_l1" for stream in ("lstm", "detail") for kind in ("weight_ih", "weight_hh", "bias_ih",
                                                                              "bias_hh")] + ["head.weight", "head.bias"])
    config = small_config("model.architecture=dual_stream")
    assert isinstance(VFER.from_config(config.model, 12), DualStreamVFER)
    assert type(VFER.from_config(small_config().model, 12)) is VFER
    plan = LocalTraining(lr=0.01, epochs=1, batch_size=8, noise_multiplier=None)
    assert batchable(config, plan) == "the dual-stream model"
    with pytest.raises(ValueError, match="per client"):
        model.stacked_forward({}, torch.zeros(1, 2, 3, 12))


def test_key_frames_without_the_second_stream_is_refused_by_name():
    with pytest.raises(ConfigError, match="model.key_frames.*dual_stream"):
        load_config(None, ["model.key_frames=4"])
    with pytest.raises(ConfigError, match="key_frames"):
        load_config(None, ["model.architecture=dual_stream", "model.key_frames=1"])
    assert load_config(None, ["model.architecture=dual_stream", "model.key_frames=4"]).model.key_frames == 4
    with pytest.raises(ConfigError, match="key_frames = 20 is more than the clips' 16 frames"):
        load_config(None, ["model.architecture=dual_stream", "model.key_frames=20"])


@pytest.mark.slow
def test_the_dual_stream_model_learns_under_distributed_dp(small_clips):
    from privfer.fl.simulation import simulate

    config = small_config("model.architecture=dual_stream", "federation.rounds=10", "federation.adaptation=false",
                          "privacy.epsilon=50")
    result = simulate(config, None, clips=small_clips)
    assert result.macro_f1 > 0.3  # chance is 1/6
