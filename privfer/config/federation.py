"""The sections of a run's config that say how it is federated and protected (privacy, aggregation,
federation): fields, defaults, bounds and each section's own checks."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from privfer.config.sections import _Section
from privfer.secagg.backends import BACKENDS, backend_named
from privfer.privacy.noise import DEFAULT as NOISE_DEFAULT, names as noise_names


BackendName = Literal[tuple(BACKENDS)]  # type: ignore[valid-type]  # aggregation.backend: a registered backend
MAX_EPSILON = 1000.0
SERVER_LR, SMALL_BUDGET_SERVER_LR = 0.02, 0.03  # distributed DP's Adam step at D = 256; the second at epsilon <= 1
SERVER_LR_FEATURE_DIM = 256  # the feature dimension those steps were fitted at (the synthetic data's)
SERVER_LR_EXPONENT = 1 / 3  # the record-level step grows as (256 / D) to this power at D features per frame
# without DP the same algorithm steps at half of 0.02 x sqrt(256 / D): Adam's steps are not damped by noise, and at
# small D the noiseless runs want the larger steps of the square root (digits: 0.916 at 0.057, 0.825 at 0.032)
NOISELESS_LR_SHARE, NOISELESS_LR_EXPONENT = 0.5, 1 / 2


def default_server_lr(epsilon: float | None, distributed: bool, unit: str, feature_dim: int | None) -> float | None:
    """federation.server_lr when unset. Record level under distributed DP: 0.02 x (256 / D)^(1/3) for frames of D
    features, at every budget — the rule fitted across the synthetic data at D = 8 to 256, digits and watch
    (docs/privacy-accounting.md, "Do the defaults transfer?") — and 0.01 x sqrt(256 / D) without DP (the same
    algorithm without noise, whose Adam steps the noise's second moment does not damp; fitted on the same data);
    None: D is not known until the data is read (CREMA-D without data.feature_dim), and the federation resolves it
    then. Otherwise 0.02, and 0.03 at epsilon <= 1 under distributed DP (person level, fitted on the default
    data)."""
    if distributed and unit == "record":
        if feature_dim is None:
            return None
        noiseless = epsilon is None or not math.isfinite(epsilon)
        share, exponent = (NOISELESS_LR_SHARE, NOISELESS_LR_EXPONENT) if noiseless else (1.0, SERVER_LR_EXPONENT)
        return share * SERVER_LR * (SERVER_LR_FEATURE_DIM / feature_dim) ** exponent
    small = distributed and epsilon is not None and epsilon <= 1.0
    return SMALL_BUDGET_SERVER_LR if small else SERVER_LR


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
    options: dict[str, float | int | bool | str] = Field(
        default_factory=dict, max_length=16,
        description="The selected mechanism's own settings, validated by it (privfer.privacy.mechanisms); the "
        "built-in mechanisms take none.",
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

    backend: BackendName = Field(
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

    def secagg_config(self, num_clients: int) -> Any:
        """The masking backend's :class:`privfer.secagg.SecAggConfig` for a round of ``num_clients`` from these
        settings, whatever ``backend`` says (ConfigError if it cannot work)."""
        return backend_named("masking").round_config(num_clients, settings=self._settings())

    def _settings(self) -> dict[str, Any]:
        """These settings as a backend's round_config reads them, ``auto`` values resolved."""
        return {**self.model_dump(), "graph": self.resolved_graph, "security": self.resolved_security}

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
        return backend_named(self.backend).round_config(num_clients, metrics, integer_sum_bound=integer_sum_bound,
                                                        min_inputs=min_inputs, settings=self._settings())


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
        description="Federated rounds (distributed DP: DP-SGD steps); None: 40 under distributed DP and its runs without DP "
        "(PrivferConfig.algorithm), 20 otherwise.",
    )
    clients_per_round: int | None = Field(
        None, ge=2, le=100_000,
        description="Clients sampled per round; None: every training client under distributed DP and its runs without DP, 20 "
        "otherwise.",
    )
    local_epochs: int = Field(2, ge=1, le=1000, description="Local epochs per round (local DP, person level, and runs without DP that train locally).")
    local_optimizer: Literal["adam", "sgd"] = Field("adam", description="Clients' optimizer, fresh each round (local DP, person level, and runs without DP that train locally).")
    local_lr: float = Field(5e-3, gt=0.0, le=100.0, description="Clients' learning rate (local DP, person level, and runs without DP that train locally).")
    personal_layers: int = Field(1, ge=1, le=16, description="FedPer: layers (from the head down) kept local.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Chance a sampled client drops out (at a uniformly random protocol stage)."
    )
    keep_best_round: bool | None = Field(
        None,
        description="End the training phase with the model of the round with the best validation macro F1 (early "
        "stopping; FedAvg-like strategies) instead of the last; None: on without DP, off with DP. True with DP is "
        "refused: the choice would release something about the validation actors, whom the ledger does not cover.",
    )
    adaptation: bool = Field(True, description="Phase 2: federated adaptation on the test actors with IFER pseudo labels.")
    adaptation_rounds: int = Field(1, ge=1, le=100_000, description="Phase 2 rounds (all test actors train each round).")
    adaptation_epochs: int = Field(1, ge=1, le=1000, description="Phase 2 local epochs per round.")
    adaptation_lr: float = Field(1e-5, gt=0.0, le=10.0, description="Phase 2 learning rate (the seed paper's 1e-5).")
    server_optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="distributed DP (and its runs without DP): the server's optimizer on the noisy mean gradient "
        "(sgd has momentum)."
    )
    server_lr: float | None = Field(
        None, gt=0.0, le=100.0,
        description="distributed DP: the server optimizer's step size; None: at record level 0.02 x (256 / D)^(1/3) "
        "for D features per frame (fitted across data sets; 0.01 x sqrt(256 / D) without DP; CREMA-D without "
        "data.feature_dim: resolved when the features are read), at person level 0.02 (0.03 at epsilon <= 1).",
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
