"""Shared fixtures: small synthetic populations that keep the suite fast."""

from __future__ import annotations

import faulthandler
import os
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from privfer.config import PrivferConfig, load_config
from privfer.data.synthetic import generate_synthetic

def chi_square_p(values: np.ndarray, support: np.ndarray, pmf: np.ndarray) -> float:
    """Chi-square goodness of fit of integer ``values`` to ``pmf`` on ``support``, in bins of >= 20 expected draws
    (draws outside the support count against the fit, in the last bin)."""
    observed = np.array([(values == k).sum() for k in support])
    expected = pmf * values.size
    obs_bins, exp_bins, run_o, run_e = [], [], 0, 0.0
    for o, e in zip(observed, expected):
        run_o, run_e = run_o + o, run_e + e
        if run_e >= 20:
            obs_bins.append(run_o)
            exp_bins.append(run_e)
            run_o, run_e = 0, 0.0
    obs_bins[-1] += run_o + (values.size - observed.sum())
    exp_bins[-1] += run_e + (values.size - expected.sum())
    return stats.chisquare(obs_bins, np.array(exp_bins) * sum(obs_bins) / sum(exp_bins)).pvalue


if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: the cores are shared between N workers, so each worker's torch gets its share (not all of them)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


SMALL = [
    "data.frames=8",
    "data.feature_dim=128",
    "data.synthetic.actors=48",
    "data.synthetic.missing_clips=0",
    "data.split.val_actors=4",
    "data.split.test_actors=8",
    "model.hidden_size=32",
    "training.epochs=6",
    "training.lr=0.003",
    "training.batch_size=64",
]


def spy_on_aggregate(monkeypatch) -> list[np.ndarray]:
    """Every array any client hands the secure aggregation from now on (privfer.fl.aggregation.aggregate)."""
    from privfer.fl import aggregation

    seen: list[np.ndarray] = []
    real = aggregation.aggregate

    def spy(updates, round_config, *args, **kwargs):
        seen.extend(a for arrays in updates.values() for a in arrays)
        return real(updates, round_config, *args, **kwargs)

    monkeypatch.setattr(aggregation, "aggregate", spy)
    return seen


def small_config(*overrides: str) -> PrivferConfig:
    """A population of 48 actors with 8 x 128 features: seconds, not minutes, to train."""
    return load_config(None, [*SMALL, *overrides])


@pytest.fixture(scope="session")
def small_clips():
    return generate_synthetic(small_config().data)


WATCHDOG_SECONDS = 960  # pyproject's pytest-timeout (900 s) needs the main thread back in Python; this does not


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test hung in native code (a lock a fork copied, say) still ends: after WATCHDOG_SECONDS faulthandler's C
    watchdog (no Python thread, so client processes still fork) prints every thread's stack and exits the worker,
    which pytest-xdist reports as a crashed test instead of a suite that never ends."""
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True, file=sys.__stderr__ or sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_collection_modifyitems(config, items):
    """The longest tests first (deployment, then slow), so that under ``pytest -n 2`` they start on both workers
    at once instead of one of them ending the suite alone; the order within each group is kept."""
    def rank(item) -> int:
        return 0 if item.get_closest_marker("deployment") else 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)  # stable
