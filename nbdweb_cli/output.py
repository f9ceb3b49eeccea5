"""Printing results: JSON for scripts (`--json`), aligned tables and key/value lists for
people."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

__all__ = ["human_size", "print_json", "print_record", "print_table", "progress_bar"]


def print_json(value: Any, out: TextIO = sys.stdout) -> None:
    json.dump(value, out, indent=2, sort_keys=True)
    out.write("\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, dict)):
        return json.dumps(value) if value else "-"
    text = str(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def print_table(
    rows: list[dict[str, Any]], columns: list[tuple[str, str]], out: TextIO = sys.stdout
) -> None:
    """`columns`: (heading, key) pairs."""
    cells = [[_cell(row.get(key)) for _, key in columns] for row in rows]
    headings = [heading for heading, _ in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headings)]
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headings, widths, strict=True))
    out.write(line.rstrip() + "\n")
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
    if not rows:
        out.write("(none)\n")


def print_record(record: dict[str, Any], keys: list[str], out: TextIO = sys.stdout) -> None:
    width = max(len(k) for k in keys)
    for key in keys:
        if key in record:
            out.write(f"{key.ljust(width)}  {_cell(record[key])}\n")


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:g} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def progress_bar(percent: int, width: int = 30) -> str:
    percent = max(0, min(100, percent))
    done = width * percent // 100
    return "[" + "#" * done + "-" * (width - done) + f"] {percent:3d}%"
