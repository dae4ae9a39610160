"""Differential privacy: per-client Opacus DP-SGD, whole-run noise calibration, the privacy ledger."""

from privfer.privacy.calibrate import (
    ClientPlan,
    PrivacyBudgetError,
    calibrate_noise,
    default_delta,
    epsilon_spent,
    plan_clients,
)
from privfer.privacy.ledger import ClientAccount, build_ledger

__all__ = [
    "ClientAccount",
    "ClientPlan",
    "PrivacyBudgetError",
    "build_ledger",
    "calibrate_noise",
    "default_delta",
    "epsilon_spent",
    "plan_clients",
]
