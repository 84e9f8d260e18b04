"""The paper-style table as Markdown (``table.md``) and as aligned plain text for the terminal."""

from __future__ import annotations

from typing import Any

from soul.report.results import Column, visible_columns


def format_value(col: Column, value: float | None, std: float | None = None) -> str:
    """Forget quality is a p-value spanning many decades: scientific notation below 0.01. Wall time in
    seconds (or m:ss). Diagnostics (norms, ρ) 3 significant digits. Everything else 3 decimals. Missing
    values print as "–"; with a standard deviation (several seeds) the cell is "mean ± std"."""
    if value is None:
        return "–"
    if std is not None:
        return f"{format_value(col, value)} ± {format_value(col, std)}"
    if col.diagnostic and col.key != "mean_clip_fraction":
        return f"{value:.3g}"
    if col.key == "wall_time_s":
        if value < 60:
            return f"{value:.1f} s"
        minutes, seconds = divmod(round(value), 60)
        return f"{minutes}m{seconds:02d}s"
    if col.key == "forget_quality" and 0 < value < 0.01:
        return f"{value:.2e}"
    return f"{value:.3f}"


def _cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    columns = visible_columns(rows)
    header = ["Method"] + [c.title for c in columns]
    body = [[row["label"]] + [format_value(c, row.get(c.key), row.get(f"{c.key}_std")) for c in columns] for row in rows]
    return header, body


def markdown_table(rows: list[dict[str, Any]], marks: dict[str, str] | None = None) -> str:
    """GitHub Markdown table; `marks` maps a row name to a suffix for its label (e.g. "★")."""
    marks = marks or {}
    header, body = _cells(rows)
    for row, cells in zip(rows, body):
        if row["name"] in marks:
            cells[0] = f"{cells[0]} {marks[row['name']]}"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def text_table(rows: list[dict[str, Any]], marks: dict[str, str] | None = None) -> str:
    """The same table with space-aligned columns, for printing."""
    marks = marks or {}
    header, body = _cells(rows)
    for row, cells in zip(rows, body):
        if row["name"] in marks:
            cells[0] = f"{cells[0]} {marks[row['name']]}"
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(c) for c in body)]) + "\n"
