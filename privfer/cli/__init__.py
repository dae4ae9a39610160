"""The ``privfer`` command line: thin typed functions over the library.

Each command parses its options into a config, calls one library function and
prints the result. A user error (bad option, config, data or run directory)
prints one line on stderr and exits with code 2, never a traceback.

One module per command group (``train``, ``simulate``, ``study``, ``data``, ``config_cmd``, ``audit``,
``identity``), the renderers in ``render.py``, and what they share in ``common.py``.
"""

from __future__ import annotations

import sys

import typer

# the commands register themselves on import, in the order `privfer --help` lists them
from privfer.cli import train, simulate, tune, study, data, config_cmd, audit, identity  # noqa: F401, I001
from privfer.cli.common import (ConfigOption, DataOption, SetOption, UsageError, app, console, errors, print_error,
                                resolve_config)


def main() -> None:
    """Console-script entry point: usage errors too are one line and exit code 2."""
    from privfer.fl.allocator import keep_freed_memory

    keep_freed_memory()  # this process is privfer's: rounds reuse the memory the round before freed
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        print_error("aborted")
        sys.exit(130)
    except Exception as exc:
        # Typer's (vendored) click raises UsageError and its kin here; they carry
        # an exit code and a message. Anything else is a bug and keeps its traceback.
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            console.print(ctx.get_help(), markup=False, highlight=False)
            sys.exit(0)
        command = ctx.command_path if ctx is not None else "privfer"
        print_error(f"{exc.format_message()} (see: {command} --help)")
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["ConfigOption", "DataOption", "SetOption", "UsageError", "app", "console", "errors", "main", "print_error",
           "resolve_config"]
