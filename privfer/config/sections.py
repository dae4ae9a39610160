"""The sections of a run's config that say what is learnt (data, model, training, output): fields, defaults,
bounds and each section's own checks; the base every section shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


# Defaults that depend on the privacy mechanism, resolved when a PrivferConfig is validated. The distributed
# ones were tuned on the validation actors (docs/privacy-accounting.md, "Defaults").
DISTRIBUTED_ROUNDS, LOCAL_ROUNDS = 40, 20
DISTRIBUTED_HIDDEN, LOCAL_HIDDEN = 64, 128
SYNTHETIC_FRAMES, SYNTHETIC_FEATURE_DIM = 16, 256
FOREIGN_SHAPES = {"digits": (8, 8), "watch": (30, 6)}  # real data a package ships (privfer/data/foreign.py): (T, D)



def validated_options(model: type[BaseModel], options: dict[str, Any], field: str, title: str) -> BaseModel:
    """A plug-in's own options section (a strategy's ``federation.strategy_options``, a mechanism's
    ``privacy.options``) validated by its ``Options`` model; ValueError naming ``field.<option>`` and what
    ``title`` takes."""
    try:
        return model.model_validate(options)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        takes = ", ".join(model.model_fields) or "none"
        raise ValueError(f"{field}{'.' + where if where else ''}: {problem['msg']} ({title} takes: {takes})") from None

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
    order_signal: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Share of the expression carried by the order of the frames rather than by every frame: 0 "
                    "shows one display throughout the apex; 1 shows two parts in turn whose order names the emotion, "
                    "so no statistic of the set of frames (their mean included) tells anger from disgust or fear "
                    "from sadness.",
    )
    hard_fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Share of the expressive (non-neutral) clips that are hard: a weak display (0.45x its "
                    "strength) or a blend (40% of it from the most similar emotion), either with a short apex "
                    "(10-20% of the clip). Annotators judge what is displayed, so their votes spread; the acted "
                    "label stays right (docs/data.md).",
    )
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


class LabelNoiseConfig(_Section):
    """Label noise injected into the training actors' clips (docs/data.md, "Label noise")."""

    rate: float = Field(
        0.0, ge=0.0, le=0.9, description="Share of training clips whose annotators systematically vote for another "
        "class where they would have voted for the acted one (their labels all name it; features unchanged). "
        "Validation and test actors stay clean.",
    )
    kind: Literal["pair", "uniform"] = Field(
        "pair", description="The wrong class: pair, the acted class's partner (anger <-> disgust, fear <-> sadness, "
        "happiness <-> neutral); uniform, one of the other five at random.",
    )
    seed: int = Field(0, ge=0, description="Which clips are corrupted (with the run seed, which sets the split).")


class SplitConfig(_Section):
    """Actor-disjoint train / validation / test split with balanced gender."""

    val_actors: int = Field(12, ge=1, description="Actors in the validation split (half male, half female).")
    test_actors: int = Field(12, ge=1, description="Actors in the test split (half male, half female).")
    adaptation_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="Share of each test actor's clips in the adaptation half."
    )


class DataConfig(_Section):
    """Where clips come from and how training targets are built."""

    source: Literal["synthetic", "cremad", "digits", "watch"] = Field(
        "synthetic", description="Built-in generator, a CREMA-D folder, or real data a package ships (docs/data.md): "
        "digits (scikit-learn's digits 0-5, rows as 8 frames of 8 features) or watch (seglearn's smartwatch "
        "exercises, 30 frames of 6 features, 10 subjects); these two need pip install -e \".[foreign]\".",
    )
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
    label_noise: LabelNoiseConfig = Field(default_factory=LabelNoiseConfig)

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
        elif self.source in FOREIGN_SHAPES:  # a package's data set has one shape
            for field, value in zip(("frames", "feature_dim"), FOREIGN_SHAPES[self.source]):
                asked = getattr(self, field)
                if asked is not None and asked != value:
                    raise ValueError(f"{field} = {asked}, but data.source {self.source!r} has {field} = {value}; "
                                     f"leave it unset")
                if asked is None:
                    setattr(self, field, value)
        return self


class ModelConfig(_Section):
    """The VFER: LSTM over frame features + linear classifier head."""

    hidden_size: int | None = Field(
        None, ge=1, le=4096, description="LSTM hidden units; None: 64 under distributed DP and its runs without DP "
        "(tuned on the validation actors), 128 otherwise.",
    )
    num_layers: int = Field(1, ge=1, le=8, description="Stacked LSTM layers.")
    readout: Literal["auto", "last", "mean", "both"] = Field(
        "auto",
        description="Clip embedding: last hidden state, mean over time, or both concatenated (the head weighs each; "
        "twice the head's weights); auto: both under distributed DP and its "
        "runs without DP (measured across data sets, docs/privacy-accounting.md), last otherwise (the seed paper's).",
    )
    recurrent: Literal["auto", "lstm", "fast_dp"] = Field(
        "auto", description="Recurrent layer: nn.LSTM, or the fast DP-SGD layer (auto: fast_dp whenever DP is on, and in runs without "
        "DP that clip per-record gradients: distributed DP-SGD without noise)."
    )
    shortcut: bool | Literal["auto"] = Field(
        "auto",
        description="Add a linear map of the clip's mean frame feature to the logits (a zero-initialised skip "
        "around the LSTM); auto: on under distributed DP and its runs without DP (tuned on the validation actors), off "
        "otherwise.",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the classifier head.")
    architecture: Literal["vfer", "dual_stream"] = Field(
        "vfer",
        description="vfer: one LSTM over the clip; dual_stream: RDFER's synopsis stream over the whole clip beside a "
        "detail stream over its key segment (docs/configuration.md).",
    )
    key_frames: int | None = Field(
        None, ge=2, le=1024, description="dual_stream: frames of the key segment the detail stream reads (None: half "
        "the clip's frames; more than data.frames is an error; a clip shorter than this is read whole).",
    )
    ifer_hidden: int = Field(128, ge=1, le=4096, description="Hidden units of the per-frame IFER head.")
    ifer_weights: Path | None = Field(None, description="Load the frozen IFER from this file instead of fitting it.")

    @model_validator(mode="after")
    def _key_frames_need_two_streams(self) -> "ModelConfig":
        if self.key_frames is not None and self.architecture != "dual_stream":
            raise ValueError(f"model.key_frames is the detail stream's segment: it needs model.architecture "
                             f"'dual_stream', not '{self.architecture}'")
        return self


class TrainingConfig(_Section):
    """Optimisation settings (the seed paper: Adam, lr 1e-4, 20 epochs, best validation loss)."""

    labels: Literal["partial", "discrete"] = Field("partial", description="KL to vote distributions, or CE to majority.")
    lr: float = Field(1e-4, gt=0.0, le=10.0, description="Adam learning rate.")
    epochs: int = Field(20, ge=1, le=100_000, description="Training epochs.")
    batch_size: int = Field(32, ge=1, le=1_000_000, description="Clips per batch.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Adam weight decay.")
    torch_threads: int | None = Field(None, ge=1, le=1024, description="torch intra-op threads (None: torch default).")


class OutputConfig(_Section):
    """Where a run writes its directory."""

    dir: Path = Field(Path("runs"), description="Parent folder of run directories.")
    save_model: bool = Field(True, description="Write the selected model's weights (model.pt).")
