"""Loading: defaults < YAML < dotted overrides, and validation errors that name the field and the range."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml
from pydantic import BaseModel, ValidationError

from privfer.config.run import PrivferConfig
from privfer.errors import ConfigError


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
