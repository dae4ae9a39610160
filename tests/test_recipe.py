"""The distributed-DP recipe for other FL code (privfer/privacy/recipe.py) and its NumPy example."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from privfer.privacy import recipe
from privfer.auditing import audit_path

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "numpy" / "dp_fedavg.py"


def test_the_numpy_example_learns_and_its_ledger_passes_the_audit(tmp_path):
    spec = importlib.util.spec_from_file_location("dp_fedavg", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(str(tmp_path / "ledger.json"))
    # a budget of epsilon 3 buys a model: the error falls from 0.72 to about 0.08 (0.03-0.18 over 20 noise draws)
    assert result["end_loss"] < result["start_loss"] / 2
    assert 2.9 < result["epsilon"] <= 3.0
    report = audit_path(tmp_path / "ledger.json")
    assert report.passed and len(report.clients) == 40


def test_the_recipe_is_torch_free():
    code = ("import sys, privfer.privacy.recipe, privfer.secagg; "
            "assert 'torch' not in sys.modules and 'opacus' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_contribution_is_clipped_and_carries_the_planned_noise():
    """The noise in a client's contribution has the share variance the plan states (a clipped zero update), and
    an update beyond the bound is scaled to it."""
    plan = recipe.plan_run(epsilon=3.0, delta=1e-5, rounds=10, clients=20, dimension=20_000)
    noise = recipe.contribute(np.zeros(plan.dimension), plan).astype(np.float64)
    assert noise.var() == pytest.approx(plan.share_variance, rel=0.05)
    big = np.full(plan.dimension, 10.0)
    decoded = recipe.contribute(big, plan) / plan.scale
    assert np.linalg.norm(decoded - big / np.linalg.norm(big) * plan.max_grad_norm) \
        <= 6 * np.sqrt(plan.share_variance * plan.dimension) / plan.scale


def test_the_server_refuses_a_sum_beyond_the_plan():
    plan = recipe.plan_run(epsilon=3.0, delta=1e-5, rounds=10, clients=20, dimension=4)
    with pytest.raises(ValueError, match="exceeds the planned bound"):
        recipe.mean_update(np.full(4, plan.sum_bound + 1), plan, 20)
    config = recipe.secagg_config(plan)
    assert config.security == "active" and config.min_inputs == plan.min_inputs
    assert config.integer_sum_bound == plan.sum_bound and config.colluders >= plan.colluders


@pytest.mark.parametrize("setting,value", [("epsilon", float("inf")), ("epsilon", float("nan")), ("epsilon", 1001.0),
                                           ("rounds", 0), ("delta", 1.0), ("participation", 0.0)])
def test_a_plan_out_of_range_is_a_config_error_naming_the_setting(setting, value):
    from privfer.errors import ConfigError

    settings = dict(epsilon=3.0, delta=1e-4, rounds=4, clients=20, dimension=50)
    settings[setting] = value
    with pytest.raises(ConfigError, match=setting):
        recipe.plan_run(**settings)
