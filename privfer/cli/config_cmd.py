"""``privfer config show | fields``: the resolved configuration and every setting."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from rich.table import Table

from privfer.cli.common import ConfigOption, DataOption, SetOption, config_app, console, resolve_config, user_errors


@config_app.command("show")
@user_errors
def config_show(
    config: Optional[Path] = ConfigOption,
    data: Optional[Path] = DataOption,
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Print the resolved config as YAML (defaults < file < --data < --set)."""
    console.print(resolve_config(config, overrides, data).to_yaml(), highlight=False, soft_wrap=True, markup=False)


@config_app.command("fields")
@user_errors
def config_fields() -> None:
    """List every setting with its default, allowed values and meaning."""
    from privfer.config import describe_fields

    table = Table(title="settings (use with --set field=value)", title_justify="left")
    for column in ("field", "default", "allowed", "description"):
        table.add_column(column)
    for row in describe_fields():
        table.add_row(row["field"], row["default"], row["allowed"], row["description"])
    console.print(table)
