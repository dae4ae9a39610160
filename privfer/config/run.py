"""The resolved config of one run: its sections, the checks across them, and the mechanism it selects."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, Field, model_validator

from privfer.config.federation import AggregationConfig, FederationConfig, PrivacyConfig, default_server_lr
from privfer.config.sections import (DISTRIBUTED_HIDDEN, DISTRIBUTED_ROUNDS, LOCAL_HIDDEN, LOCAL_ROUNDS, DataConfig,
                                     ModelConfig, OutputConfig, TrainingConfig, _Section, validated_options)
from privfer.privacy.mechanisms import MECHANISMS, PrivacyMechanism, select
from privfer.privacy.noise import DEFAULT as NOISE_DEFAULT


class PrivferConfig(_Section):
    """The resolved configuration of one run."""

    seed: int = Field(0, ge=0, le=2**32 - 1, description="Run seed: splits, weight init, shuffling, client sampling.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _mechanism_fits_aggregator(self) -> "PrivferConfig":
        backends = {b for m in MECHANISMS.values() if m.selected_by == self.privacy.mechanism for b in m.backends or ()}
        if backends and self.aggregation.backend not in backends:
            why = (
                "its approximate decryption is not the exact integer sum the noise shares' distribution needs"
                if self.aggregation.backend == "ckks"
                else "a plain sum shows the server every client's contribution with only its share of the noise"
            )
            raise ValueError(
                f"privacy.mechanism '{self.privacy.mechanism}' needs aggregation.backend "
                f"{' or '.join(repr(b) for b in sorted(backends))}, not "
                f"'{self.aggregation.backend}': {why}; use privacy.mechanism 'local' with it"
            )
        return self

    @model_validator(mode="after")
    def _noise_needs_the_sum(self) -> "PrivferConfig":
        in_sum = any(m.noise_in_sum for m in MECHANISMS.values() if m.selected_by == self.mechanism)
        if self.privacy.noise != NOISE_DEFAULT and self.privacy.enabled and not in_sum:
            raise ValueError(
                f"privacy.noise '{self.privacy.noise}' is a noise family of the secure sum: it needs "
                f"privacy.mechanism 'distributed' (with aggregation.backend 'masking'); local DP-SGD adds Opacus's "
                f"Gaussian noise (allowed here: privacy.noise '{NOISE_DEFAULT}', the default)"
            )
        return self

    @model_validator(mode="after")
    def _person_needs_the_sum(self) -> "PrivferConfig":
        units = {m.unit for m in MECHANISMS.values() if m.selected_by == self.mechanism}
        if self.privacy.enabled and self.privacy.unit not in units:
            protecting = " or ".join(repr(m.selected_by) for m in MECHANISMS.values() if m.unit == self.privacy.unit)
            why = {"person": " (with aggregation.backend 'masking'): the noise that protects a whole person is only "
                   "affordable inside the secure sum; use privacy.unit 'record' with privacy.mechanism 'local'"}
            raise ValueError(f"privacy.unit '{self.privacy.unit}' needs privacy.mechanism {protecting}"
                             + why.get(self.privacy.unit, ""))
        if self.privacy.unit == "person" and self.algorithm == "distributed" and self.federation.strategy == "fedper":
            raise ValueError(
                "privacy.unit 'person' with federation.strategy 'fedper' is not built on the distributed line (nor its "
                "runs without DP, the same algorithm): the newcomers' head (the mean of the persons' heads) and the "
                "scores of the personal heads would be released without noise, and the personal heads have no step; "
                "use fedavg, privacy.unit 'record', or without DP privacy.mechanism 'local'"
            )
        return self

    @model_validator(mode="after")
    def _key_segment_within_the_clip(self) -> "PrivferConfig":
        frames, key = self.data.frames, self.model.key_frames
        if key is not None and frames is not None and key > frames:
            raise ValueError(f"model.key_frames = {key} is more than the clips' {frames} frames (data.frames): the "
                             f"detail stream would read the whole clip again; set at most {frames}, or leave it unset "
                             f"(half the clip)")
        return self

    @model_validator(mode="after")
    def _mechanism_options(self) -> "PrivferConfig":
        """privacy.options, held to the selected mechanism's Options model (checked for runs without DP too: a
        study's no-DP cell shares its line's settings)."""
        try:
            mechanism = select(self.selected_mechanism, self.privacy.unit)
        except ValueError:  # the unit check above says why
            return self
        if mechanism is not None:
            validated_options(mechanism.Options, self.privacy.options, "privacy.options", mechanism.title)
        return self

    @model_validator(mode="after")
    def _mechanism_defaults(self) -> "PrivferConfig":
        # Resolved here, so config.yaml and `privfer config show` state the rounds a run really uses.
        distributed = self.algorithm == "distributed"
        if self.federation.rounds is None:
            self.federation.rounds = DISTRIBUTED_ROUNDS if distributed else LOCAL_ROUNDS
        if self.model.readout == "auto":
            self.model.readout = "both" if distributed else "last"
        if self.model.hidden_size is None:
            self.model.hidden_size = DISTRIBUTED_HIDDEN if distributed else LOCAL_HIDDEN
        if self.model.shortcut == "auto":
            self.model.shortcut = distributed
        mechanism = select(self.algorithm, self.privacy.unit)  # the algorithm's mechanism, with or without noise
        if self.model.recurrent == "auto" and mechanism is not None and not mechanism.per_sample_gradients:
            self.model.recurrent = "lstm"  # e.g. person level clips whole updates: no per-sample gradients
        if self.model.recurrent == "auto" and not self.privacy.enabled and distributed:
            self.model.recurrent = "fast_dp"  # distributed DP-SGD without noise still clips each record's gradient
        if distributed and self.privacy.unit == "record" and self.model.recurrent == "lstm":
            raise ValueError(
                "model.recurrent 'lstm' cannot train with distributed DP-SGD (nor its runs without DP): it clips each "
                "record's gradient, which needs the fast DP layer; use model.recurrent 'fast_dp' (or 'auto'), or "
                "privacy.mechanism 'local'")
        if self.federation.keep_best_round is None:
            self.federation.keep_best_round = not self.privacy.enabled
        if self.federation.keep_best_round and self.privacy.enabled:
            raise ValueError(
                "federation.keep_best_round true with privacy.epsilon set: choosing a round by the validation actors' "
                "clips releases something about people the ledger does not cover; leave it unset (off with DP)")
        if self.federation.server_lr is None:  # validation actors, benchmarks/tune_distributed.py, across data sets
            self.federation.server_lr = self.resolved_server_lr(self.data.feature_dim)
        return self

    def resolved_server_lr(self, feature_dim: int | None) -> float | None:
        """federation.server_lr, or the step the rule gives this run for frames of ``feature_dim`` features (None:
        the rule needs a feature dimension that is not known yet)."""
        if self.federation.server_lr is not None:
            return self.federation.server_lr
        return default_server_lr(self.privacy.epsilon, self.algorithm == "distributed", self.privacy.unit,
                                 feature_dim)

    @property
    def algorithm(self) -> str | None:
        """How the run trains: its mechanism's algorithm ('distributed' or 'local'; None: local training without DP).

        A run without DP on the distributed line (privacy.mechanism distributed, or auto over masking) trains with
        that line's algorithm at its unit with the noise taken out — record level: distributed DP-SGD; person level:
        distributed DP-FedAvg — the same model, steps, clipping, secret coins, server optimizer and secure sum, so it
        is the ceiling of that line's private runs (a study's no-DP cell), not another algorithm; a strategy that
        needs local steps (fedprox) is refused at record level, as under distributed DP-SGD. The local line trains
        without DP by local epochs (FedAvg over the secure sum)."""
        if self.privacy.enabled:
            return self.mechanism
        return "distributed" if self.selected_mechanism == "distributed" else None

    @property
    def mechanism(self) -> str | None:
        """The privacy mechanism this run uses: 'distributed', 'local', or None without DP."""
        return self.selected_mechanism if self.privacy.enabled else None

    @property
    def selected_mechanism(self) -> str:
        """privacy.mechanism with 'auto' resolved ('distributed' over masking, else 'local'), whether or not the run
        is private: a study's no-DP cell belongs to its mechanism's line."""
        if self.privacy.mechanism == "auto":
            return "distributed" if self.aggregation.backend == "masking" else "local"
        return self.privacy.mechanism

    @property
    def privacy_mechanism(self) -> PrivacyMechanism | None:
        """The registered mechanism (:mod:`privfer.privacy.mechanisms`) this run's privacy.mechanism and unit
        select; None without DP."""
        return select(self.mechanism, self.privacy.unit)

    @property
    def mechanism_options(self) -> BaseModel | None:
        """privacy.options as the run's mechanism's validated ``Options`` model; None without DP."""
        mechanism = self.privacy_mechanism
        if mechanism is None:
            return None
        return validated_options(mechanism.Options, self.privacy.options, "privacy.options", mechanism.title)

    @property
    def mechanism_id(self) -> str | None:
        """The mechanism's id in the ledger (e.g. 'distributed', 'distributed_person', 'local'), or None."""
        mechanism = self.privacy_mechanism
        return None if mechanism is None else mechanism.id

    @property
    def trained_by(self) -> str:
        """How this run trains, in the words its run directory (``run.json``) and its ledger record: with DP the
        mechanism's id; without DP the ledger's sentence for the algorithm (:attr:`algorithm` and the unit), so a
        run directory or study cell written when the same settings trained otherwise is not taken for this run."""
        if self.privacy.enabled:
            return str(self.mechanism_id)
        from privfer.privacy.ledger.opacus import TRAINED_BY_DPFEDAVG, TRAINED_BY_DPSGD, TRAINED_LOCALLY

        if self.algorithm != "distributed":
            return TRAINED_LOCALLY
        return TRAINED_BY_DPFEDAVG if self.privacy.unit == "person" else TRAINED_BY_DPSGD

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (paths as strings) suitable for YAML and JSON."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

