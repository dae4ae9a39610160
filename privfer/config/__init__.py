"""One validated configuration object for a whole privfer run.

A :class:`PrivferConfig` is built from pydantic defaults, a YAML file and dotted
overrides (``training.epochs=5``), in that order, and flows down the pipeline;
no module reads environment variables or global state on its own. Every bound
is checked here, at load time: an invalid value raises :class:`ConfigError`
naming the field, the value and the allowed range.
"""

from __future__ import annotations

from privfer.config.federation import (MAX_EPSILON, SERVER_LR, SMALL_BUDGET_SERVER_LR, AggregationConfig,
                                       FederationConfig, PrivacyConfig)
from privfer.config.loading import (apply_overrides, build_config, describe_fields, format_validation_error,
                                    load_config, parse_override, read_yaml)
from privfer.config.run import PrivferConfig
from privfer.config.sections import (DISTRIBUTED_HIDDEN, DISTRIBUTED_ROUNDS, LOCAL_HIDDEN, LOCAL_ROUNDS,
                                     SYNTHETIC_FEATURE_DIM, SYNTHETIC_FRAMES, DataConfig, LabelNoiseConfig, ModelConfig,
                                     OutputConfig, SplitConfig, SyntheticConfig, TrainingConfig)

__all__ = [
    "AggregationConfig", "apply_overrides", "build_config", "DataConfig", "describe_fields", "DISTRIBUTED_HIDDEN",
    "DISTRIBUTED_ROUNDS", "FederationConfig", "format_validation_error", "LabelNoiseConfig", "load_config",
    "LOCAL_HIDDEN", "LOCAL_ROUNDS", "MAX_EPSILON", "ModelConfig", "OutputConfig", "parse_override", "PrivacyConfig",
    "PrivferConfig", "read_yaml", "SERVER_LR", "SMALL_BUDGET_SERVER_LR", "SplitConfig", "SYNTHETIC_FEATURE_DIM",
    "SYNTHETIC_FRAMES", "SyntheticConfig", "TrainingConfig",
]
