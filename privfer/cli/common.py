"""What every command shares: the Typer app and its groups, the consoles, the shared options, one-line user
errors (exit 2), config resolution and run directories."""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from privfer import __version__
from privfer.config import PrivferConfig, load_config
from privfer.errors import PrivferError
from privfer.runs import create_unique_dir


app = typer.Typer(
    name="privfer",
    help="Private federated learning for video facial expression recognition.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect and export the clip data.", no_args_is_help=True)
config_app = typer.Typer(help="Show the resolved configuration and every setting.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

console = Console()
errors = Console(stderr=True)

ConfigOption = typer.Option(None, "--config", "-c", help="YAML config file (defaults: configs/default.yaml's values).")
SetOption = typer.Option(
    None, "--set", "-s", help="Override a setting, e.g. --set training.epochs=5 (repeatable)."
)
DataOption = typer.Option(None, "--data", help="CREMA-D folder with features/ (default: built-in synthetic data).")
OutOption = typer.Option(None, "--out", "-o", help="Run directory (re-run to resume).")
JsonOption = typer.Option(False, "--json", help="Print the result as JSON instead of tables.")


def print_error(message: str) -> None:
    """One line on stderr; the message is text, never Rich markup (paths may hold brackets)."""
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`PrivferError` into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PrivferError as exc:
            print_error(str(exc))
            raise typer.Exit(2) from None

    return wrapper


def resolve_config(
    config: Optional[Path], overrides: Optional[List[str]], data: Optional[Path] = None, **settings: Any
) -> PrivferConfig:
    """Config file, then --data, then command options, then --set overrides (last wins)."""
    extra: list[str] = []
    if data is not None:
        extra += ["data.source=cremad", f"data.root={json.dumps(str(data))}"]
    extra += [f"{key}={json.dumps(value)}" for key, value in settings.items() if value is not None]
    return load_config(config, [*extra, *(overrides or [])])


def version_callback(value: bool) -> None:
    if value:
        console.print(f"privfer {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Print the version."),
) -> None:
    """privfer: DP-SGD clients, secure aggregation and privacy audits for video FER."""


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextlib.contextmanager
def run_directory(out: Optional[Path], cfg: PrivferConfig, stem: str) -> Iterator[Path]:
    """``out``, or a new ``{output.dir}/{stem}-{time}``; folders made here are removed again on a user error."""
    made = [] if out is not None or cfg.output.dir.exists() else [cfg.output.dir]
    run_dir = out if out is not None else create_unique_dir(cfg.output.dir, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out is None:
        made.insert(0, run_dir)
    try:
        yield run_dir
    except PrivferError:
        for folder in made:  # folders made for this run that still hold nothing
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


class UsageError(PrivferError):
    """A command was called with options that do not fit together."""
