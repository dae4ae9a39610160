"""What ``privfer simulate`` returns: a typed result, written as ``result.json`` and read back on resume.

The classification reports (``test``, ``test_after_training``...) stay the
plain dictionaries of :func:`privfer.metrics.classification_report` (macro,
micro, per-class scores), shared with ``privfer train``; everything else is a
field with a type. :meth:`SimulationResult.from_json` refuses a file whose
fields are missing or of the wrong type (a damaged or foreign result.json)
instead of handing back half a result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from privfer.errors import RunDirectoryError

Report = dict[str, Any]  # privfer.metrics.classification_report


@dataclass(frozen=True)
class PrivacySummary:
    unit: str  # "record" or "person"
    mechanism: str | None  # "distributed", "distributed_person", "local", None without DP
    target_epsilon: float | None
    delta: float
    accountant: str
    epsilon_max: float | None
    epsilon_median: float | None
    noise_multiplier_min: float | None
    noise_multiplier_max: float | None


@dataclass(frozen=True)
class RoundCounts:
    training: int
    adaptation: int
    aborted: int


@dataclass(frozen=True)
class AggregationSummary:
    seconds: float
    bytes_per_client_mean: float
    clipped_values: int


@dataclass(frozen=True)
class DataSummary:
    source: str
    train_clips: int
    test_eval_clips: int


_NESTED = {"privacy": PrivacySummary, "rounds": RoundCounts, "secure_aggregation": AggregationSummary,
           "data": DataSummary}


@dataclass(frozen=True)
class SimulationResult:
    """The outcome of a federation run (see ``docs/configuration.md`` for what each part means)."""

    command: ClassVar[str] = "simulate"

    strategy: str
    aggregator: str
    aggregator_private: bool
    private: bool
    test: Report  # the final scores: after adaptation if it ran, else after training
    test_after_training: Report | None
    test_after_adaptation: Report | None
    privacy: PrivacySummary
    rounds: RoundCounts
    clients: dict[str, int]  # phase -> clients
    pseudo_labels: dict[str, Any] | None
    secure_aggregation: AggregationSummary
    data: DataSummary
    seconds: float  # rounds of every invocation + the last one's preparation
    # what the privacy promise assumes of the server: "active" (it may deviate from the protocol) or "semi_honest"
    # (it follows it); results written before the field existed were semi-honest
    security: str = "semi_honest"
    # the training round whose model the run kept: runs without DP keep their best validation round (None: the last)
    selected_round: int | None = None

    @property
    def macro_f1(self) -> float:
        return float(self.test["macro"]["f1"])

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, **asdict(self)}

    @classmethod
    def from_json(cls, raw: Any, where: str = "result.json") -> "SimulationResult":
        if not isinstance(raw, dict) or raw.get("command") != cls.command:
            raise RunDirectoryError(f"{where} is not a privfer simulate result; delete it to rerun")
        try:
            values = {f.name: raw[f.name] for f in dataclasses.fields(cls)
                      if f.name in raw or f.default is dataclasses.MISSING}
            for name, kind in _NESTED.items():
                values[name] = kind(**values[name])
        except (KeyError, TypeError) as exc:
            raise RunDirectoryError(f"{where} is incomplete or damaged ({exc.__class__.__name__}: {exc}); "
                                    "delete it to rerun") from None
        return cls(**values)


__all__ = ["AggregationSummary", "DataSummary", "PrivacySummary", "RoundCounts", "SimulationResult"]
