"""What every benchmark does with its finished table: print it, and write it to --out when given."""
from __future__ import annotations

from pathlib import Path


def emit(lines: list[str], out: Path | None) -> None:
    """Print the table's lines; with out, also write them there (one trailing newline)."""
    table = "\n".join(lines)
    print(table)
    if out:
        out.write_text(table + "\n")
