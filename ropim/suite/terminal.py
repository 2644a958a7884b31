"""The report as printed where a run ends: wrapped to the terminal's width (100 columns at
most), tables split into column groups that each repeat the method column."""

from __future__ import annotations

import textwrap

WIDTH = 100


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _render(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for number, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _table(block: list[str], width: int) -> list[str]:
    """A markdown table as plain columns; wider than ``width``: several tables, each with the
    first column and as many others as fit."""
    rows = [_cells(line) for line in block if not set(line.strip()) <= set("|-: ")]
    if not rows:
        return []
    columns = len(rows[0])
    rows = [row + [""] * (columns - len(row)) for row in rows]
    first = max(len(row[0]) for row in rows)
    groups, current, used = [], [], first
    for index in range(1, columns):
        need = max(len(row[index]) for row in rows) + 2
        if current and used + need > width:
            groups.append(current)
            current, used = [], first
        current.append(index)
        used += need
    groups.append(current)
    out: list[str] = []
    for group in groups:
        out += _render([[row[0], *(row[i] for i in group)] for row in rows])
        out.append("")
    return out


def terminal_text(markdown: str, width: int = WIDTH) -> str:
    """``markdown`` for a terminal: no images, prose wrapped, tables within ``width``."""
    out: list[str] = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("|"):
            block = []
            while index < len(lines) and lines[index].startswith("|"):
                block.append(lines[index])
                index += 1
            out += _table(block, width)
            continue
        index += 1
        if line.startswith("!["):
            continue
        indent = "  " if line.startswith("- ") else ""  # a bullet's lines hang under it
        out += textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False) or [""]
    kept = [line for i, line in enumerate(out) if line or (i > 0 and out[i - 1])]
    return "\n".join(kept).rstrip() + "\n"  # at most one blank line in a row
