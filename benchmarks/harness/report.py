"""Tables a runner writes beside its results.

    `markdown_table(header, rows)`   one GitHub markdown table (no trailing newline)
    `csv_text(rows)`            CSV of a list of dicts (columns from the first row)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def markdown_table(header: list[str], rows: Iterable[Iterable[Any]], align: list[str] | None = None) -> str:
    """A GitHub markdown table; `align` holds one of "", "l", "r" per column (default: none). No trailing newline."""
    marks = {"": "---", "l": ":---", "r": "---:"}
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "|" + "".join(marks[a] + "|" for a in (align or [""] * len(header)))]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(rows: list[dict[str, Any]]) -> str:
    """A list of dicts as CSV text, the first row's keys as the header; empty text for no rows."""
    import csv
    import io

    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()
