"""Study specs: a YAML grid over config fields, validated and expanded into cells before anything runs.

A spec names a base (a config file and/or dotted settings applied to every
cell), a grid (dotted config field -> list of values; the cells are the
cartesian product) and seeds::

    name: quick
    config: null                 # optional base YAML config, relative to the spec file
    base:                        # dotted settings for every cell
      federation.rounds: 10
    grid:
      privacy.epsilon: [1, 8, inf]
      federation.strategy: [fedavg, fedper]
    exclude:                     # optional: combinations of grid values not to run (every key must match)
      - {privacy.epsilon: inf, federation.strategy: fedper}
    seeds: [0, 1]
    workers: auto                # parallel worker processes (auto: one per 2 cores ... see runner)

Every cell's config is built (and so validated) at load time: an unknown
field or a value out of range is one clear error before any training.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from privfer.config import PrivferConfig, load_config
from privfer.errors import ConfigError


class StudySpec(BaseModel):
    """What a study runs (see the module docstring for the YAML form)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("study", min_length=1, max_length=80, description="Study name (folder names, titles).")
    config: Path | None = Field(None, description="Base YAML config for every cell.")
    base: dict[str, Any] = Field(default_factory=dict, description="Dotted settings applied to every cell.")
    grid: dict[str, list[Any]] = Field(..., description="Dotted config field -> values; cells are the product.")
    exclude: list[dict[str, Any]] = Field(default_factory=list, description="Combinations of grid values not to "
                                          "run: a cell is left out when its values match every key of an entry.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="Run seeds of every cell.")
    workers: int | Literal["auto"] = Field("auto", description="Parallel worker processes.")

    @field_validator("grid")
    @classmethod
    def _grid_values(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not grid:
            raise ValueError("the grid needs at least one field")
        for key, values in grid.items():
            if key == "seed":
                raise ValueError("use 'seeds' for the run seed, not a grid entry")
            if not values:
                raise ValueError(f"grid field {key} has no values")
            if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
                raise ValueError(f"grid field {key} repeats a value")
        return grid

    @model_validator(mode="after")
    def _exclusions(self) -> "StudySpec":
        for index, entry in enumerate(self.exclude):
            if not entry:
                raise ValueError(f"exclude entry {index} is empty (it would leave out every cell)")
            for key, value in entry.items():
                if key not in self.grid:
                    raise ValueError(f"exclude entry {index}: {key} is not a grid field")
                if not any(_same(value, v) for v in self.grid[key]):
                    raise ValueError(f"exclude entry {index}: {value!r} is not one of {key}'s grid values")
        return self

    def excluded(self, values: dict[str, Any]) -> bool:
        """Whether the grid values ``values`` match an exclude entry."""
        return any(all(_same(values[k], v) for k, v in entry.items()) for entry in self.exclude)

    @field_validator("workers")
    @classmethod
    def _workers(cls, workers: int | str) -> int | str:
        if isinstance(workers, int) and not 1 <= workers <= 64:
            raise ValueError("workers must be between 1 and 64, or auto")
        return workers


def _canonical(value: Any) -> Any:
    """A grid value as the config reads it: numbers as floats ("inf" and .inf alike, 3 and 3.0 alike), the rest as
    JSON."""
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", ".inf", "infinity"):
        return math.inf
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return json.dumps(value, sort_keys=True, default=str)


def _same(a: Any, b: Any) -> bool:
    return _canonical(a) == _canonical(b)


@dataclass(frozen=True)
class Cell:
    """One run of the study: its grid values, seed and resolved config."""

    id: str
    values: dict[str, Any]
    seed: int
    config: PrivferConfig

    def overrides(self) -> dict[str, Any]:
        return {**self.values, "seed": self.seed}


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-") or "x"


def cell_id(values: dict[str, Any], seed: int) -> str:
    """A readable, filesystem-safe, unique folder name for a cell."""
    parts = [f"{key.split('.')[-1]}={_text(value)}" for key, value in values.items()] + [f"seed={seed}"]
    digest = hashlib.sha256(json.dumps({**values, "seed": seed}, sort_keys=True, default=str).encode()).hexdigest()
    return ("_".join(parts))[:150] + "_" + digest[:8]


def _dotted(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


def expand(spec: StudySpec, root: Path | None = None) -> list[Cell]:
    """Every cell of the grid x seeds, each with its validated config (ConfigError names the cell)."""
    base_path = None
    if spec.config is not None:
        base_path = spec.config if spec.config.is_absolute() or root is None else root / spec.config
    keys = list(spec.grid)
    cells = []
    for combination in itertools.product(*(spec.grid[k] for k in keys)):
        values = dict(zip(keys, combination))
        if spec.excluded(values):
            continue
        for seed in spec.seeds:
            overrides = [_dotted(k, v) for k, v in spec.base.items()] + [_dotted(k, v) for k, v in values.items()]
            overrides.append(f"seed={seed}")
            try:
                config = load_config(base_path, overrides)
            except ConfigError as exc:
                where = ", ".join(f"{k}={v}" for k, v in values.items())
                raise ConfigError(f"study cell ({where}, seed {seed}): {exc}") from None
            cells.append(Cell(cell_id(values, seed), values, seed, config))
    if not cells:
        raise ConfigError("exclude: its entries leave no cell of the grid to run")
    return cells


def load_spec(path: Path | str) -> tuple[StudySpec, list[Cell]]:
    """Read, validate and expand a study spec file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study spec {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"study spec {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"study spec {path} must be a mapping with at least 'grid'")
    try:
        spec = StudySpec(**raw)
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            field = ".".join(str(p) for p in item["loc"]) or "spec"
            message = "unknown setting" if item["type"] == "extra_forbidden" else item["msg"].removeprefix(
                "Value error, ")
            problems.append(f"{field}: {message}")
        raise ConfigError(f"study spec {path}: " + "; ".join(problems)) from None
    return spec, expand(spec, path.parent)


__all__ = ["Cell", "StudySpec", "cell_id", "expand", "load_spec"]
