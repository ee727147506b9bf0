"""Console output of the commands (the CLI layer): tables of key/value rows."""

from __future__ import annotations


def print_table(rows: dict, title: str | None = None) -> None:
    """Print key/value rows as a two-column table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        table.add_row(str(k), f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    Console().print(table)
