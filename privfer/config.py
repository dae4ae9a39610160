"""One validated configuration object for a whole privfer run.

A :class:`PrivferConfig` is built from pydantic defaults, a YAML file and dotted
overrides (``training.epochs=5``), in that order, and flows down the pipeline;
no module reads environment variables or global state on its own. Every bound
is checked here, at load time: an invalid value raises :class:`ConfigError`
naming the field, the value and the allowed range.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from privfer.errors import ConfigError
from privfer.privacy.mechanisms import MECHANISMS, PrivacyMechanism, select
from privfer.privacy.noise import DEFAULT as NOISE_DEFAULT, names as noise_names


# Defaults that depend on the privacy mechanism, resolved when a PrivferConfig is validated. The distributed
# ones were tuned on the validation actors (docs/privacy-accounting.md, "Defaults").
DISTRIBUTED_ROUNDS, LOCAL_ROUNDS = 40, 20
DISTRIBUTED_HIDDEN, LOCAL_HIDDEN = 64, 128
SYNTHETIC_FRAMES, SYNTHETIC_FEATURE_DIM = 16, 256


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads `yes`/`true` as booleans and Python counts them as 0/1;
        # `epochs: true` meaning one epoch would be a silent misconfiguration.
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = set(getattr(annotation, "__args__", ())) | {annotation}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"expected a number, got the boolean {value}")
        return value


class SyntheticConfig(_Section):
    """Knobs of the built-in CREMA-D-like generator (see docs/data.md)."""

    seed: int = Field(0, ge=0, description="Which synthetic population: the dataset's identity, not the run seed.")
    actors: int = Field(91, ge=4, le=10_000, description="Number of actors (clients).")
    male_fraction: float = Field(48 / 91, gt=0.0, lt=1.0, description="Share of male actors (CREMA-D: 48 of 91).")
    missing_clips: int = Field(20, ge=0, description="Clips dropped at random, as CREMA-D has 7,442 of 7,462.")
    latent_dim: int = Field(24, ge=8, le=512, description="Dimension of the latent face-expression space.")
    expression_strength: float = Field(
        0.8, gt=0.0, le=10.0, description="Scale of the displayed expression against identity and nuisance."
    )
    actor_idiosyncrasy: float = Field(
        0.8, ge=0.0, le=10.0, description="Spread of each actor's own way of showing each emotion."
    )
    clip_noise: float = Field(0.55, ge=0.0, le=10.0, description="Per-clip variation of the displayed expression.")
    frame_noise: float = Field(0.6, ge=0.0, le=10.0, description="Per-frame noise of the frame features.")
    perception_temperature: float = Field(
        0.5, gt=0.0, le=100.0, description="Annotators' uncertainty: higher spreads votes over more classes."
    )
    min_annotators: int = Field(4, ge=1, le=1000, description="Fewest annotator votes per clip.")
    max_annotators: int = Field(12, ge=1, le=1000, description="Most annotator votes per clip.")

    @model_validator(mode="after")
    def _annotator_range(self) -> "SyntheticConfig":
        if self.min_annotators > self.max_annotators:
            raise ValueError(
                f"min_annotators ({self.min_annotators}) must be <= max_annotators ({self.max_annotators})"
            )
        return self


class SplitConfig(_Section):
    """Actor-disjoint train / validation / test split with balanced gender."""

    val_actors: int = Field(12, ge=1, description="Actors in the validation split (half male, half female).")
    test_actors: int = Field(12, ge=1, description="Actors in the test split (half male, half female).")
    adaptation_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="Share of each test actor's clips in the adaptation half."
    )


class DataConfig(_Section):
    """Where clips come from and how training targets are built."""

    source: Literal["synthetic", "cremad"] = Field("synthetic", description="Built-in generator or a CREMA-D folder.")
    root: Path | None = Field(None, description="CREMA-D folder (required when source is cremad).")
    votes: Literal["tabulated", "responses"] = Field(
        "tabulated",
        description="Visual-only votes from processedResults/tabulatedVotes.csv or finishedResponses.csv.",
    )
    frames: int | None = Field(
        None, ge=2, le=1024, description="Frames per clip (T); synthetic: 16 when unset. CREMA-D: read from the "
        "features when unset; a value that differs from theirs is an error.",
    )
    feature_dim: int | None = Field(
        None, ge=2, le=8192, description="Features per frame (D); synthetic: 256 when unset. CREMA-D: read from the "
        "features when unset; a value that differs from theirs is an error.",
    )
    eval_target: Literal["intended", "majority"] = Field(
        "intended", description="Ground truth for metrics: the acted emotion or the annotators' majority vote."
    )
    partial_label_temperature: float = Field(
        1.0, gt=0.0, le=1000.0, description="Softmax temperature over vote counts (1 = the seed paper)."
    )
    pseudo_label_threshold: float = Field(
        0.5, ge=0.0, lt=1.0, description="IFER pseudo labels are kept when the top probability exceeds this."
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)

    @field_validator("root", mode="after")
    @classmethod
    def _absolute_root(cls, root: Path | None) -> Path | None:
        # Store the folder absolutely so the resolved config names the same data from any directory.
        return None if root is None else root.expanduser().absolute()

    @model_validator(mode="after")
    def _root_for_cremad(self) -> "DataConfig":
        if self.source == "cremad" and self.root is None:
            raise ValueError("root is required when source is 'cremad' (the CREMA-D folder)")
        if self.source == "synthetic":  # the generator's defaults, stated in the resolved config
            if self.frames is None:
                self.frames = SYNTHETIC_FRAMES
            if self.feature_dim is None:
                self.feature_dim = SYNTHETIC_FEATURE_DIM
        return self


class ModelConfig(_Section):
    """The VFER: LSTM over frame features + linear classifier head."""

    hidden_size: int | None = Field(
        None, ge=1, le=4096, description="LSTM hidden units; None: 64 under distributed DP (tuned on the validation "
        "actors), 128 otherwise.",
    )
    num_layers: int = Field(1, ge=1, le=8, description="Stacked LSTM layers.")
    readout: Literal["auto", "last", "mean"] = Field(
        "auto",
        description="Clip embedding: last hidden state or mean over time; auto: mean under distributed DP (tuned on "
        "the validation actors), last otherwise (the seed paper's).",
    )
    recurrent: Literal["auto", "lstm", "fast_dp"] = Field(
        "auto", description="Recurrent layer: nn.LSTM, or the fast DP-SGD layer (auto: fast_dp whenever DP is on)."
    )
    shortcut: bool | Literal["auto"] = Field(
        "auto",
        description="Add a linear map of the clip's mean frame feature to the logits (a zero-initialised skip "
        "around the LSTM); auto: on under distributed DP (tuned on the validation actors), off otherwise.",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the classifier head.")
    ifer_hidden: int = Field(128, ge=1, le=4096, description="Hidden units of the per-frame IFER head.")
    ifer_weights: Path | None = Field(None, description="Load the frozen IFER from this file instead of fitting it.")


class TrainingConfig(_Section):
    """Optimisation settings (the seed paper: Adam, lr 1e-4, 20 epochs, best validation loss)."""

    labels: Literal["partial", "discrete"] = Field("partial", description="KL to vote distributions, or CE to majority.")
    lr: float = Field(1e-4, gt=0.0, le=10.0, description="Adam learning rate.")
    epochs: int = Field(20, ge=1, le=100_000, description="Training epochs.")
    batch_size: int = Field(32, ge=1, le=1_000_000, description="Clips per batch.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Adam weight decay.")
    torch_threads: int | None = Field(None, ge=1, le=1024, description="torch intra-op threads (None: torch default).")


MAX_EPSILON = 1000.0
SERVER_LR, SMALL_BUDGET_SERVER_LR = 0.02, 0.03  # distributed DP's Adam step; the second at epsilon <= 1


class PrivacyConfig(_Section):
    """The differential-privacy budget (used by federated runs; the centralized baseline is non-private)."""

    epsilon: float | None = Field(
        None, description=f"TOTAL per-client budget for the whole run, in (0, {MAX_EPSILON:g}]; None or inf trains "
        "without DP."
    )
    delta: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="None: 1 / (10 x the federation's records) under distributed DP, 1 / (10 x the largest "
        "client's record count) under local DP; printed.",
    )
    unit: Literal["record", "person"] = Field(
        "record",
        description="Privacy unit: record (one clip of one client; DP-SGD) or person (everything one client holds; "
        "DP-FedAvg with the noise in the secure sum, privacy.mechanism distributed only).",
    )
    max_grad_norm: float = Field(1.0, gt=0.0, le=1e6, description="record: per-sample gradient clipping bound.")
    max_update_norm: float = Field(
        0.5, gt=0.0, le=1e6, description="person: each client's whole round update is clipped to this L2 norm."
    )
    participation: float = Field(
        1.0, gt=0.0, le=1.0,
        description="person: each selected client's secret coin: the probability that its clipped update (not zeros) "
        "is in its masked input; every selected client always sends its noise share. Accounted as Poisson "
        "sampling at this rate.",
    )
    accountant: Literal["prv", "rdp"] = Field(
        "prv", description="Opacus accountant for calibration and the ledger (both sound upper bounds)."
    )
    noise_source: Literal["run_key", "os", "run_seed"] = Field(
        "run_key",
        description="DP noise and Poisson sampling from a secret per-run key (resumable), fresh OS randomness, "
        "or the public run seed (reproducible experiments only: anyone with the config can recompute the noise).",
    )
    max_noise_multiplier: float = Field(
        50.0, gt=0.0, le=1e4, description="A budget that needs more noise than this is refused as unreachable."
    )
    mechanism: Literal["auto", "distributed", "local"] = Field(
        "auto",
        description="distributed: the DP noise lives in the securely aggregated sum (each client adds a noise "
        "share of privacy.noise; one DP-SGD step per round); local: every client adds its full DP-SGD noise (Opacus) as if the server "
        "saw its update; auto: distributed with the masking aggregator, local otherwise.",
    )
    noise: str = Field(
        NOISE_DEFAULT,
        description="distributed: the noise family of the shares in the secure sum, one of those registered in "
        "privfer.privacy.noise (docs/privacy-accounting.md compares them).",
    )
    sample_rate: float = Field(
        1.0, gt=0.0, le=1.0,
        description="distributed: probability that a record is in a round's step (Poisson; 1 = every record).",
    )
    rounding_overhead: float = Field(
        0.01, gt=0.0, le=1.0,
        description="distributed: the integer scale makes randomized rounding add at most this share to the "
        "sensitivity (sqrt(d) / (C x scale)).",
    )

    @field_validator("noise")
    @classmethod
    def _known_noise(cls, value: str) -> str:
        if value not in noise_names():
            raise ValueError(f"must be one of {', '.join(noise_names())}, got {value!r}")
        return value

    @field_validator("epsilon")
    @classmethod
    def _epsilon_range(cls, value: float | None) -> float | None:
        # Past a few dozen a budget protects nothing measurable; past MAX_EPSILON it is a typo or an attack on
        # the calibration (its accountants' cost grows with the epsilon they compute).
        if value is None or value == math.inf:
            return value
        if not (0.0 < value <= MAX_EPSILON):  # also NaN and -inf
            raise ValueError(f"must be in (0, {MAX_EPSILON:g}] (or inf for no DP), got {value}")
        return value

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None and math.isfinite(self.epsilon)


class AggregationConfig(_Section):
    """How client updates are summed without the server seeing them (see docs/secure-aggregation.md)."""

    backend: Literal["masking", "ckks", "plain"] = Field(
        "masking", description="Pairwise-mask SecAgg, CKKS encryption, or a plain sum (NOT private: a baseline)."
    )
    modulus_bits: Literal[32, 64] = Field(32, description="Masking arithmetic modulus 2^k.")
    clipping_range: float = Field(8.0, gt=0.0, le=1e9, description="Quantization range: |value| <= this (clipped values are reported).")
    graph: Literal["auto", "complete", "harary"] = Field(
        "auto",
        description="SecAgg+'s sparse graph (O(log n) neighbours; complete when n is small), or all pairs; auto: "
        "complete under active security (a sparse graph drawn from the server's choices is not safe against it), "
        "harary otherwise.",
    )
    threshold_fraction: float = Field(
        0.5, ge=0.5, lt=1.0, description="Shamir threshold t = floor(fraction x group) + 1 (0.5: strict majority)."
    )
    expected_dropout: float = Field(0.1, ge=0.0, lt=0.5, description="Dropout rate the SecAgg+ degree is sized for.")
    colluding_fraction: float = Field(
        0.1, ge=0.0, lt=0.5,
        description="Share of a round's clients that may collude with the server (SecAgg+ degree sizing; "
        "distributed DP sizes noise shares so the others alone carry the noise).",
    )
    min_inputs_fraction: float = Field(
        0.9, gt=0.0, le=1.0,
        description="distributed DP: clients refuse to unmask a round with fewer than ceil(fraction x clients) inputs.",
    )
    security: Literal["auto", "active", "semi_honest"] = Field(
        "auto",
        description="active (auto with masking): every client is an enrolled member (an in-process enrollment "
        "authority, not the server, signs the roster), key advertisements are signed and no share is revealed "
        "before enough members signed the same view of the round (survivors, roster, model and plan): privacy "
        "holds against a server that deviates from the protocol. semi_honest (auto with ckks and plain): the "
        "server is trusted to follow it (labelled in the trust line, the ledger and result.json).",
    )
    roster: Literal["full", "group"] = Field(
        "full",
        description="masking: each client receives every participant's keys (O(n) bytes), or everyone's ids as "
        "runs and only its group's keys (O(log n + runs) bytes on the SecAgg+ graph; one run per gap or "
        "dropout); either way it derives the graph itself.",
    )

    def secagg_config(self, num_clients: int, **extra: Any) -> Any:
        """The :class:`privfer.secagg.SecAggConfig` for a round of ``num_clients`` (ConfigError if it cannot work)."""
        from privfer.secagg.config import make_config

        return make_config(
            num_clients=num_clients,
            modulus_bits=self.modulus_bits,
            clipping_range=self.clipping_range,
            graph=self.resolved_graph,
            threshold_fraction=self.threshold_fraction,
            expected_dropout=self.expected_dropout,
            colluding_fraction=self.colluding_fraction,
            roster=self.roster,
            security=self.resolved_security,
            **extra,
        )

    @property
    def resolved_graph(self) -> str:
        """``graph`` with ``auto`` resolved: complete under active security, harary otherwise."""
        if self.graph != "auto":
            return self.graph
        return "complete" if self.resolved_security == "active" else "harary"

    @property
    def resolved_security(self) -> str:
        """``security`` with ``auto`` resolved: active with the masking backend, semi_honest otherwise."""
        if self.security != "auto":
            return self.security
        return "active" if self.backend == "masking" else "semi_honest"

    @model_validator(mode="after")
    def _security_fits_backend(self) -> "AggregationConfig":
        if self.security == "active" and self.backend != "masking":
            why = ("TenSEAL has no threshold decryption, so the key authority must be trusted to decrypt only "
                   "aggregates" if self.backend == "ckks" else "a plain sum shows the server every update")
            raise ValueError(f"aggregation.security 'active' needs aggregation.backend 'masking', not "
                             f"'{self.backend}': {why}; use aggregation.security 'semi_honest' (or 'auto')")
        if self.resolved_security == "active" and self.graph == "harary":
            raise ValueError(
                "aggregation.graph 'harary' cannot be used with aggregation.security 'active': the server chooses "
                "the roster and round id the sparse graph is drawn from (protocols/secagg/SPEC.md, section 1); use "
                "aggregation.graph 'complete' (or 'auto'), or aggregation.security 'semi_honest'")
        if self.resolved_security == "active" and self.roster == "group":
            raise ValueError(
                "aggregation.roster 'group' cannot be used with aggregation.security 'active' yet: a client that "
                "sees only its group's keys cannot verify the signatures the consistency check and min_inputs rest "
                "on with O(log n) work; use aggregation.roster 'full' or aggregation.security 'semi_honest'")
        return self

    def round_config(
        self,
        num_clients: int,
        metrics: tuple[str, ...] = (),
        *,
        integer_sum_bound: int | None = None,
        min_inputs: int | None = None,
    ) -> Any:
        """The backend config of one round: SecAggConfig, CKKSConfig or PlainConfig (all run by
        :func:`privfer.secagg.aggregate`). ``integer_sum_bound``: the inputs are already-encoded integers whose
        sum must be exact (distributed DP) — CKKS's approximate decryption cannot give that and is refused."""
        integer = integer_sum_bound is not None
        if self.backend == "plain":
            from privfer.secagg.plain import PlainConfig

            return PlainConfig(num_clients=num_clients, encoding="integer" if integer else "fixed_point",
                               min_inputs=min_inputs or 1, metrics=metrics,
                               wire_bits=self.modulus_bits if integer else 32)
        if self.backend == "ckks":
            if integer:
                raise ConfigError("aggregation.backend = 'ckks' cannot sum integer contributions exactly "
                                  "(approximate decryption); use 'masking'")
            from privfer.secagg.he import make_ckks_config

            # the key authority releases sums of at least two honest clients besides the colluders the config allows
            # (a server chooses which signed updates it forwards)
            from privfer.secagg.config import assumed_colluders

            colluders = assumed_colluders(num_clients, self.colluding_fraction)
            return make_ckks_config(num_clients=num_clients, clipping_range=self.clipping_range, metrics=metrics,
                                    min_clients=min(num_clients, max(2, colluders + 2)))
        extra: dict[str, Any] = {}
        if integer:
            extra = dict(encoding="integer", integer_sum_bound=integer_sum_bound, min_inputs=min_inputs)
        return self.secagg_config(num_clients, metrics=metrics, **extra)


class FederationConfig(_Section):
    """Rounds, client sampling and the FL strategy."""

    strategy: str = Field(
        "fedavg", pattern=r"^[a-z][a-z0-9_]{0,31}$",
        description="The FL strategy, one of those registered in privfer.fl.strategies (docs/configuration.md lists "
        "them); checked when the federation is prepared.",
    )
    strategy_options: dict[str, float | int | bool | str] = Field(
        default_factory=dict, max_length=16,
        description="The strategy's own options (e.g. fedprox's mu), checked by the strategy.",
    )
    rounds: int | None = Field(
        None, ge=1, le=100_000,
        description="Federated rounds (distributed DP: DP-SGD steps); None: 40 under distributed DP, 20 otherwise.",
    )
    clients_per_round: int | None = Field(
        None, ge=2, le=100_000,
        description="Clients sampled per round; None: every training client under distributed DP, 20 otherwise.",
    )
    local_epochs: int = Field(2, ge=1, le=1000, description="Local epochs per round (local DP and runs without DP).")
    local_optimizer: Literal["adam", "sgd"] = Field("adam", description="Clients' optimizer, fresh each round (local DP and runs without DP).")
    local_lr: float = Field(5e-3, gt=0.0, le=100.0, description="Clients' learning rate (local DP and runs without DP).")
    personal_layers: int = Field(1, ge=1, le=16, description="FedPer: layers (from the head down) kept local.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Chance a sampled client drops out (at a uniformly random protocol stage)."
    )
    adaptation: bool = Field(True, description="Phase 2: federated adaptation on the test actors with IFER pseudo labels.")
    adaptation_rounds: int = Field(1, ge=1, le=100_000, description="Phase 2 rounds (all test actors train each round).")
    adaptation_epochs: int = Field(1, ge=1, le=1000, description="Phase 2 local epochs per round.")
    adaptation_lr: float = Field(1e-5, gt=0.0, le=10.0, description="Phase 2 learning rate (the seed paper's 1e-5).")
    server_optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="distributed DP: the server's optimizer on the noisy mean gradient (sgd has momentum)."
    )
    server_lr: float | None = Field(
        None, gt=0.0, le=100.0,
        description="distributed DP: the server optimizer's step size; None: 0.03 at epsilon <= 1, else 0.02 "
        "(tuned on the validation actors).",
    )
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="distributed DP: SGD momentum.")
    batched_training: bool = Field(
        True, description="person level: train the round's clients together, stacked along a client axis (the "
        "same steps as one by one, up to float rounding; models with dropout or the fast DP layer train one by one).",
    )

    def cohort_size(self, mechanism: str | None, clients: int) -> int:
        """Clients per training round: the setting, or its default for the mechanism (all under distributed DP)."""
        if self.clients_per_round is not None:
            return self.clients_per_round
        return clients if mechanism == "distributed" else min(20, clients)


class OutputConfig(_Section):
    """Where a run writes its directory."""

    dir: Path = Field(Path("runs"), description="Parent folder of run directories.")
    save_model: bool = Field(True, description="Write the selected model's weights (model.pt).")


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
        if self.privacy.unit == "person" and self.privacy.enabled and self.federation.strategy == "fedper":
            raise ValueError(
                "privacy.unit 'person' with federation.strategy 'fedper' is not built: the newcomers' head (the mean "
                "of the persons' heads) and the scores of the personal heads would be released without noise; use "
                "fedavg, or privacy.unit 'record'"
            )
        return self

    @model_validator(mode="after")
    def _mechanism_defaults(self) -> "PrivferConfig":
        # Resolved here, so config.yaml and `privfer config show` state the rounds a run really uses.
        distributed = self.mechanism == "distributed"
        if self.federation.rounds is None:
            self.federation.rounds = DISTRIBUTED_ROUNDS if distributed else LOCAL_ROUNDS
        if self.model.readout == "auto":
            self.model.readout = "mean" if distributed else "last"
        if self.model.hidden_size is None:
            self.model.hidden_size = DISTRIBUTED_HIDDEN if distributed else LOCAL_HIDDEN
        if self.model.shortcut == "auto":
            self.model.shortcut = distributed
        mechanism = self.privacy_mechanism
        if self.model.recurrent == "auto" and mechanism is not None and not mechanism.per_sample_gradients:
            self.model.recurrent = "lstm"  # e.g. person level clips whole updates: no per-sample gradients
        if self.federation.server_lr is None:  # validation actors, benchmarks/tune_distributed.py
            small = distributed and self.privacy.epsilon <= 1.0
            self.federation.server_lr = SMALL_BUDGET_SERVER_LR if small else SERVER_LR
        return self

    @property
    def mechanism(self) -> str | None:
        """The privacy mechanism this run uses: 'distributed', 'local', or None without DP."""
        if not self.privacy.enabled:
            return None
        if self.privacy.mechanism == "auto":
            return "distributed" if self.aggregation.backend == "masking" else "local"
        return self.privacy.mechanism

    @property
    def privacy_mechanism(self) -> PrivacyMechanism | None:
        """The registered mechanism (:mod:`privfer.privacy.mechanisms`) this run's privacy.mechanism and unit
        select; None without DP."""
        return select(self.mechanism, self.privacy.unit)

    @property
    def mechanism_id(self) -> str | None:
        """The mechanism's id in the ledger (e.g. 'distributed', 'distributed_person', 'local'), or None."""
        mechanism = self.privacy_mechanism
        return None if mechanism is None else mechanism.id

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (paths as strings) suitable for YAML and JSON."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------
# loading


def _number(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}"


def _field_bounds(loc: tuple[Any, ...]) -> str | None:
    """The allowed range of the field at ``loc``, from its pydantic metadata."""
    model: type[BaseModel] | None = PrivferConfig
    info = None
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        annotation = info.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if info is None:
        return None
    lower = upper = None
    for item in info.metadata:
        for name, symbol in (("ge", ">="), ("gt", ">")):
            if hasattr(item, name):
                lower = f"{symbol} {_number(getattr(item, name))}"
        for name, symbol in (("le", "<="), ("lt", "<")):
            if hasattr(item, name):
                upper = f"{symbol} {_number(getattr(item, name))}"
    parts = [p for p in (lower, upper) if p]
    return " and ".join(parts) if parts else None


def describe_fields(model: type[BaseModel] = None, prefix: str = "") -> list[dict[str, str]]:  # type: ignore[assignment]
    """Every setting as (field, default, allowed, description) rows, for docs and ``privfer config fields``."""
    model = PrivferConfig if model is None else model
    rows: list[dict[str, str]] = []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe_fields(annotation, prefix=f"{dotted}."))
            continue
        default = info.get_default(call_default_factory=True)
        allowed = _field_bounds(tuple(dotted.split(".")))
        choices = getattr(annotation, "__args__", None)
        if allowed is None and choices and getattr(annotation, "__origin__", None) is Literal:
            allowed = " | ".join(str(c) for c in choices)
        rows.append(
            {
                "field": dotted,
                "default": "null" if default is None else str(default),
                "allowed": allowed or "",
                "description": info.description or "",
            }
        )
    return rows


def format_validation_error(error: ValidationError) -> str:
    """One readable line per invalid field: ``field = value: problem (allowed: range)``."""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        field = ".".join(str(p) for p in loc) or "<config>"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown setting")
            continue
        bounds = _field_bounds(loc)
        got = item.get("input")
        got_text = "" if isinstance(got, dict) else f" = {got!r}"
        suffix = f" (allowed: {bounds})" if bounds else ""
        lines.append(f"{field}{got_text}: {message}{suffix}")
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-typed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    path = [p.strip() for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.__class__.__name__})") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw (not yet validated) config mapping."""
    merged = _deep_copy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                joined = ".".join(path[: depth + 1])
                raise ConfigError(f"override {text!r}: {joined} is a value, not a section")
            node = child
        node[path[-1]] = value
    return merged


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, raising :class:`ConfigError` naming the file on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not a {type(loaded).__name__}")
    return loaded


def build_config(raw: Mapping[str, Any], *, source: str = "config") -> PrivferConfig:
    """Validate a raw mapping into a :class:`PrivferConfig` or raise :class:`ConfigError`."""
    try:
        return PrivferConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(f"invalid {source}: {format_validation_error(exc)}") from None


def load_config(path: Path | str | None = None, overrides: Iterable[str] = ()) -> PrivferConfig:
    """Defaults, then the YAML file at ``path`` (if any), then dotted ``overrides``."""
    raw = read_yaml(Path(path)) if path is not None else {}
    overrides = list(overrides)
    merged = apply_overrides(raw, overrides)
    source = f"config {path}" if path is not None else "config"
    if overrides:
        source += " with overrides"
    return build_config(merged, source=source)
