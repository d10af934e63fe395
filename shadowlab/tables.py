"""The one Markdown writer of tables (``markdown_table``): the result tables of experiments/, the model-zoo tables
of defenses/, the cost table and the benchmark's tables all go through it. It sits in the base layer so that every
layer may use it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

# A column's format: a code (see markdown_table) or a function from the (not None) value to the cell's text.
Format = str | Callable[[Any], str]


def number(v: float | None, pct: bool = False, digits: int = 3) -> str:
    """v as a percentage with one decimal (pct) or a float with ``digits`` decimals; None prints "-"."""
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


def cell(v: Any, fmt: Format) -> str:
    """One cell's text: None prints "-", otherwise v in the format of ``markdown_table``."""
    if v is None:
        return "-"
    if callable(fmt):
        return fmt(v)
    if fmt == "pct":
        return number(v, pct=True)
    if fmt == "pct0":
        return f"{100 * v:.0f}%"
    if fmt == "int":
        return str(int(v))
    if fmt == "str":
        return str(v)
    return number(v, digits=int(fmt))


def markdown_table(columns: Sequence[tuple[str, str, Format]], rows: Iterable[Mapping[str, Any]]) -> str:
    """The one Markdown writer of tables: columns are (header, row key, format) with format "pct" (a share as a
    percentage with one decimal), "pct0" (no decimal), "int", "str" (as it is), a digit count such as "3" (a float
    with that many decimals), or a function from the value to its text; a missing key or None prints "-".
    Returns the header line, the ``|---|`` line and one line per row, joined by newlines (no trailing newline)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k), f) for _, k, f in columns) + " |" for r in rows]
    return "\n".join(lines)


__all__ = ["Format", "cell", "markdown_table", "number"]
