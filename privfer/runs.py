"""Run directories: the unit of output, written atomically and resumable.

A run directory holds ``config.yaml`` (the resolved config), results as JSON,
and checkpoints. Every file is written to a temporary sibling and renamed into
place, so a run killed half-way never leaves a half-written result.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from privfer.errors import RunDirectoryError

if TYPE_CHECKING:
    from privfer.config import PrivferConfig


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(folder: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. some network filesystems)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """Write to a temporary sibling, flush, fsync, rename into place, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; results are ordinary files
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda h: h.write(text), "w")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda h: h.write(data), "wb")


def _json_safe(value: Any) -> Any:
    """JSON has no infinity: write non-finite floats as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(_json_safe(payload), indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    _atomic_write(path, lambda h: torch.save(obj, h), "wb")


CHECKPOINT_MAGIC = b"PFCK\x01"  # then the SHA-256 of the payload, then torch.save's bytes


def save_checkpoint(path: Path, obj: Any) -> None:
    """A checkpoint with an integrity check: a flipped byte anywhere is refused on load, never trained on."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    _atomic_write(path, lambda h: h.write(CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload), "wb")


def load_checkpoint(path: Path | None, resumed: bool) -> dict[str, Any] | None:
    """The checkpoint a resumed run continues from (None: start afresh); a damaged one is a RunDirectoryError."""
    if not resumed or path is None or not path.exists():
        return None
    import io

    import torch

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RunDirectoryError(f"{path} cannot be read ({exc.strerror or exc})") from None
    head = len(CHECKPOINT_MAGIC)
    if raw[:head] != CHECKPOINT_MAGIC or len(raw) < head + 32:
        raise RunDirectoryError(f"{path} is not a privfer checkpoint (or predates integrity checks); delete it to "
                                "restart the run")
    digest, payload = raw[head : head + 32], raw[head + 32 :]
    if not hmac.compare_digest(digest, hashlib.sha256(payload).digest()):
        raise RunDirectoryError(f"{path} fails its integrity check (SHA-256): it was modified or damaged; delete it "
                                "to restart the run")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise RunDirectoryError(f"{path} cannot be read ({exc.__class__.__name__}); delete it to restart the run"
                                ) from None


RUN_FILE = "run.json"  # which command made the directory


def prepare_run_dir(run_dir: Path, config: PrivferConfig, command: str) -> bool:
    """Create ``run_dir`` with its ``config.yaml``; returns True when it resumes an earlier run.

    A directory that already holds a run may only be reused by the same command with the same resolved config
    (then the run resumes); anything else is refused rather than mixing two runs' outputs.
    """
    try:
        return _prepare_run_dir(Path(run_dir), config, command)
    except OSError as exc:
        raise RunDirectoryError(f"run directory {run_dir} cannot be used: {exc.strerror or exc}") from None


LEGACY = object()  # run.json without trained_by: written before it was recorded


def training_mismatch(run_dir: Path, config: PrivferConfig) -> str | None:
    """Why the run in ``run_dir`` did not train as ``config`` trains now (``config.trained_by``, recorded in
    ``run.json``), or None. A directory written before run.json recorded it trained a person-level run without DP
    on the distributed line by local FedAvg: that one, and only that, is taken to differ."""
    path = Path(run_dir) / RUN_FILE
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("trained_by", LEGACY) if path.exists() else LEGACY
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return f"has no readable {RUN_FILE}"
    if recorded is LEGACY:
        changed = not config.privacy.enabled and config.algorithm == "distributed" and config.privacy.unit == "person"
        return ("was trained (without DP, at person level) by FedAvg of local epochs, before this privfer trained "
                "such runs by distributed DP-FedAvg without its noise") if changed else None
    if recorded != config.trained_by:
        return f"was trained by {str(recorded)[:200]!r}, and this privfer trains it by {config.trained_by!r}"
    return None


def with_added_settings(existing: Any, config: "PrivferConfig") -> Any:
    """A run's saved config (``config.yaml``) with the settings added to privfer since it was written read at their
    defaults: a key the saved config lacks, whose value in ``config`` is the field's default, takes that value (a
    run from before the setting existed ran as its default does, e.g. ``model.architecture`` vfer). A missing key
    whose value here is not the default stays missing, so the configs still differ."""
    from pydantic import BaseModel

    def fill(saved: Any, resolved: dict, model: type[BaseModel]) -> Any:
        if not isinstance(saved, dict):
            return saved
        out = dict(saved)
        for key, field in model.model_fields.items():
            if key not in resolved:
                continue
            kind = field.annotation
            if key not in out:
                default = field.get_default(call_default_factory=True)
                if isinstance(default, BaseModel):
                    default = default.model_dump(mode="json")
                if default == resolved[key]:
                    out[key] = resolved[key]
            elif isinstance(kind, type) and issubclass(kind, BaseModel) and isinstance(resolved[key], dict):
                out[key] = fill(out[key], resolved[key], kind)
        return out

    return fill(existing, config.to_dict(), type(config))


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The dotted keys whose values differ between two resolved configs, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in list(old) + [k for k in new if k not in old]:
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def create_unique_dir(parent: Path, stem: str) -> Path:
    """A new, empty directory ``parent/stem`` (or ``stem-2``, ``stem-3``...), created exclusively."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 1000):
            candidate = parent / (stem if attempt == 1 else f"{stem}-{attempt}")
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
    except OSError as exc:
        raise RunDirectoryError(f"cannot create a run directory under {parent}: {exc.strerror or exc}") from None
    raise RunDirectoryError(f"cannot create a run directory under {parent}: too many named {stem}")


def _prepare_run_dir(run_dir: Path, config: PrivferConfig, command: str) -> bool:
    config_path = run_dir / "config.yaml"
    resolved = config.to_dict()
    run_file = run_dir / RUN_FILE
    if run_file.exists():
        try:
            made_by = json.loads(run_file.read_text(encoding="utf-8")).get("command")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise RunDirectoryError(f"{run_file} is unreadable; choose another --out") from None
        if made_by != command:
            raise RunDirectoryError(f"{run_dir} holds a privfer {made_by} run, not a {command} run; choose another "
                                    "--out")
    if config_path.exists():
        try:
            existing = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            raise RunDirectoryError(f"{config_path} is unreadable; choose another --out") from None
        existing = with_added_settings(existing, config)
        if existing != resolved:
            differences = _differences(existing, resolved)
            shown = ", ".join(f"{key}: {json.dumps(old)} there, {json.dumps(new)} now" for key, old, new in differences[:3])
            settings = " ".join(f"--set {key}={json.dumps(old)}" for key, old, _ in differences[:3]
                                if not isinstance(old, dict))
            # a setting left to privfer ("auto" or null there) that it resolves differently now cannot be given back
            unresolved = [key for key, old, _ in differences if old is None or old == "auto"]
            advice = (f"this privfer resolves {', '.join(unresolved[:3])} differently, so it cannot resume it"
                      if unresolved else f"to resume it, give its settings ({settings})")
            raise RunDirectoryError(
                f"{run_dir} holds a run with a different config ({shown}); {advice}; or choose another --out for a "
                "new run (deleting it does not undo what its rounds released)"
            )
        mismatch = training_mismatch(run_dir, config)
        if mismatch is not None:
            raise RunDirectoryError(f"{run_dir} holds a run that {mismatch}, so it cannot resume it; choose another "
                                    "--out for a new run (deleting it does not undo what its rounds released)")
        return True
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirectoryError(f"{run_dir} exists and is not a privfer run directory; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_file, json.dumps({"command": command, "trained_by": config.trained_by}) + "\n")
    atomic_write_text(config_path, config.to_yaml())
    return False
