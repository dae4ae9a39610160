"""Clip agreement (privfer/fl/strategies/clip_agreement.py): sub-clips that agree on another class mark a noisy
label; sub-clips that disagree mark a hard clip, which keeps its label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privfer.data.clips import NUM_CLASSES
from privfer.errors import ConfigError
from privfer.fl.rounds import ADAPTATION, TRAINING
from privfer.fl.simulation import simulate
from privfer.fl.strategies import make_strategy
from privfer.fl.strategies.base import checked_client_data
from privfer.fl.strategies.clip_agreement import (CLEAN, HARD, NOISY, ClipAgreement, ClipAgreementOptions,
                                                   agreement_split, windows)

from conftest import small_config


class MeanFrame(torch.nn.Module):
    """A model whose logits are the sub-clip's mean frame: frames one-hot in a class show that class."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.mean(dim=1)


def frames_showing(*classes: int) -> torch.Tensor:
    """(T, C) frames, frame t one-hot in classes[t]."""
    return torch.nn.functional.one_hot(torch.tensor(classes), NUM_CLASSES).float()


def planted():
    """Three clips of 8 frames, every label anger (0): clean (anger throughout), noisy (fear throughout: the label
    is wrong), hard (anger, disgust, fear and happiness in turn: a mixed display, rightly labelled)."""
    clean = frames_showing(*[0] * 8)
    noisy = frames_showing(*[2] * 8)
    hard = frames_showing(0, 0, 1, 1, 2, 2, 3, 3)
    features = torch.stack([clean, noisy, hard])
    votes = torch.tensor([[0.8, 0.2, 0, 0, 0, 0], [0.7, 0, 0.3, 0, 0, 0], [0.6, 0.2, 0.2, 0, 0, 0]])
    return features, votes


def test_windows_cover_the_clip_evenly():
    assert windows(8, 4, 0.25) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert windows(16, 4, 0.5) == [(0, 8), (3, 11), (5, 13), (8, 16)]
    assert windows(3, 4, 0.1) == [(0, 2), (0, 2), (1, 3), (1, 3)]  # at least two frames; too short: repeated


def test_the_split_on_hand_made_predictions():
    kind, consensus = agreement_split(np.array([[2, 2, 2, 2], [0, 1, 2, 3], [0, 0, 0, 1], [1, 1, 1, 0]]),
                                      np.array([0, 0, 0, 0]), agreement=0.75)
    assert kind.tolist() == [NOISY, HARD, CLEAN, NOISY] and consensus.tolist() == [2, -1, 0, 1]
    # at agreement 1, three of four is not consistent: a hard clip, not a noisy one
    kind, _ = agreement_split(np.array([[1, 1, 1, 0]]), np.array([0]), agreement=1.0)
    assert kind.tolist() == [HARD]


@pytest.mark.parametrize("noisy", ["weight", "relabel"])
def test_a_planted_noisy_clip_is_flipped_and_a_planted_hard_one_kept(noisy):
    features, votes = planted()
    strategy = ClipAgreement(ClipAgreementOptions(subclips=4, window=0.25, warmup=0, noisy=noisy, confidence=0))
    kind, consensus = strategy.split(MeanFrame(), features, votes)
    assert kind.tolist() == [CLEAN, NOISY, HARD] and consensus.tolist() == [0, 2, -1]
    data, state = strategy.client_data(TRAINING, 7, features, votes, MeanFrame, None, round_index=0)
    data = checked_client_data(strategy, 7, 3, votes, data)  # what the federation checks before training on it
    assert state is None  # nothing kept on the client
    if noisy == "weight":
        assert data.weights.tolist() == [1.0, 0.0, 1.0] and torch.equal(data.targets, votes)
    else:  # the noisy clip now names fear; the clean and the hard clip keep their vote distributions
        assert data.weights is None
        assert torch.equal(data.targets[1], torch.nn.functional.one_hot(torch.tensor(2), NUM_CLASSES).float())
        assert torch.equal(data.targets[[0, 2]], votes[[0, 2]])
    # discrete labels are relabelled as classes
    classes = votes.argmax(dim=-1)
    data, _ = strategy.client_data(TRAINING, 7, features, classes, MeanFrame, None, round_index=0)
    if noisy == "relabel":
        assert data.targets.tolist() == [0, 2, 0]


def test_warmup_counts_rounds_of_the_run_and_adaptation_keeps_the_clients_labels():
    features, votes = planted()
    strategy = ClipAgreement(ClipAgreementOptions(subclips=4, window=0.25, warmup=2, confidence=0))
    for index in (0, 1):  # the run's first two rounds: the client's own labels, whichever of them it joins
        assert strategy.client_data(TRAINING, 1, features, votes, MeanFrame, None, round_index=index)[0] is None
    data, _ = strategy.client_data(TRAINING, 1, features, votes, MeanFrame, None, round_index=2)
    assert data is not None  # a client's first turn at round 2 is past the warmup (stop 42 counted its turns)
    assert strategy.client_data(ADAPTATION, 1, features, votes, MeanFrame, None, round_index=9)[0] is None
    # a clip whose sub-clips all agree with its label changes nothing
    clean = features[[0]]
    assert strategy.client_data(TRAINING, 1, clean, votes[[0]], MeanFrame, None, round_index=9)[0] is None


def test_a_tie_in_the_votes_is_not_a_disagreement_and_confidence_gates_the_flip():
    features, votes = planted()
    tied = votes.clone()
    tied[1] = torch.tensor([0.5, 0, 0.5, 0, 0, 0])  # anger and fear tied: the sub-clips' fear is one of its labels
    strategy = ClipAgreement(ClipAgreementOptions(subclips=4, window=0.25, warmup=0, confidence=0))
    assert strategy.split(MeanFrame(), features, tied)[0].tolist() == [CLEAN, CLEAN, HARD]
    # the mean frame of a one-hot window is believed with probability softmax([1, 0, ...]) = 0.35 for its class
    believed = ClipAgreement(ClipAgreementOptions(subclips=4, window=0.25, warmup=0, confidence=0.3))
    doubted = ClipAgreement(ClipAgreementOptions(subclips=4, window=0.25, warmup=0, confidence=0.4))
    assert believed.split(MeanFrame(), features, votes)[0].tolist() == [CLEAN, NOISY, HARD]
    assert doubted.split(MeanFrame(), features, votes)[0].tolist() == [CLEAN, HARD, HARD]  # agreed, not believed


def test_options_are_checked_by_name():
    with pytest.raises(ConfigError, match="agreement"):
        make_strategy(small_config("federation.strategy=clip_agreement",
                                   "federation.strategy_options={agreement: 0.5}").federation)
    strategy = make_strategy(small_config("federation.strategy=clip_agreement",
                                          "federation.strategy_options={subclips: 3, noisy: relabel}").federation)
    assert strategy.options.subclips == 3 and strategy.options.noisy == "relabel"


def test_it_runs_under_record_level_distributed_dp_within_the_budget(small_clips):
    # a clip's weight and target depend on that clip and the received model only: record level is allowed
    base = ["privacy.epsilon=8", "federation.rounds=3", "federation.adaptation=false", "output.save_model=false",
            "privacy.noise_source=run_seed"]
    agreed = simulate(small_config(*base, "federation.strategy=clip_agreement",
                                   "federation.strategy_options={warmup: 1, confidence: 0}"), None, clips=small_clips)
    assert agreed.privacy.epsilon_max <= 8.0 + 1e-9 and agreed.privacy.unit == "record"
    # the same noise and split with FedAvg: the reweighted clips changed what was learnt
    fedavg = simulate(small_config(*base), None, clips=small_clips)
    assert agreed.test != fedavg.test
