import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from privfer.data.labels import discrete_labels, partial_labels, pseudo_labels
from privfer.errors import DataError

vote_rows = arrays(np.int64, st.tuples(st.integers(1, 20), st.just(6)), elements=st.integers(0, 12)).filter(
    lambda v: bool(np.all(v.sum(axis=1) > 0))
)


@settings(max_examples=200, deadline=None)
@given(votes=vote_rows, temperature=st.floats(0.5, 50.0))
def test_partial_labels_are_distributions_with_exact_zeros(votes, temperature):
    labels = partial_labels(votes, temperature)
    assert labels.shape == votes.shape
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-6)
    assert np.all(labels[votes == 0] == 0.0)  # exactly zero, not tiny
    assert np.all(labels[votes > 0] > 0.0)
    # more votes never means less probability
    for row, probs in zip(votes, labels):
        order = np.argsort(row, kind="stable")
        assert np.all(np.diff(probs[order]) >= -1e-7)


def test_partial_labels_are_the_masked_softmax_of_counts():
    votes = np.array([[3, 1, 0, 0, 2, 0]])
    expected = np.exp([3.0, 1.0, 2.0]) / np.exp([3.0, 1.0, 2.0]).sum()
    np.testing.assert_allclose(partial_labels(votes)[0, [0, 1, 4]], expected, rtol=1e-6)
    assert partial_labels(votes)[0, [2, 3, 5]].tolist() == [0.0, 0.0, 0.0]
    # a single voted class takes everything
    assert partial_labels(np.array([[0, 0, 0, 7, 0, 0]]))[0].tolist() == [0, 0, 0, 1, 0, 0]


@pytest.mark.parametrize(
    "votes, message",
    [(np.array([[0, 0, 0, 0, 0, 0]]), "row 0 has no votes"), (np.array([[1, -1, 0, 0, 0, 0]]), "non-negative")],
)
def test_partial_labels_reject_impossible_votes(votes, message):
    with pytest.raises(DataError, match=message):
        partial_labels(votes)


def test_discrete_labels_majority_and_tie_rule():
    votes = np.array(
        [
            [5, 1, 0, 0, 0, 0],  # clear majority
            [3, 3, 0, 0, 0, 0],  # tie anger/disgust, acted disgust -> disgust
            [3, 3, 0, 0, 0, 0],  # tie, acted fear (not tied) -> first in order: anger
            [0, 0, 2, 0, 2, 1],  # tie fear/neutral, acted neutral -> neutral
        ]
    )
    intended = np.array([1, 1, 2, 4])
    assert discrete_labels(votes, intended).tolist() == [0, 1, 0, 4]
    assert discrete_labels(votes).tolist() == [0, 0, 0, 2]


def test_pseudo_labels_average_frames_and_threshold():
    frame_probs = np.zeros((3, 2, 6))
    frame_probs[0, :, 3] = 1.0  # confident happiness
    frame_probs[1, 0, 0], frame_probs[1, 0, 1] = 0.6, 0.4  # frames disagree: mean 0.3/0.2/0.5
    frame_probs[1, 1, 2], frame_probs[1, 1, 0] = 1.0, 0.0
    frame_probs[2, :, 5] = 0.5
    frame_probs[2, :, 4] = 0.5  # exactly 0.5 is not above the threshold
    labels, keep = pseudo_labels(frame_probs, threshold=0.5)
    assert labels[0] == 3 and keep.tolist() == [True, False, False]
    assert pseudo_labels(frame_probs, threshold=0.25)[1].tolist() == [True, True, True]
