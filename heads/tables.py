"""The tables of a sweep's summary and of `refseg-compare`: Markdown with `mean ± std` cells, and CSV
with every value, each cell spelled by `cell_text`."""

from __future__ import annotations

import csv
import io
import math


def mean_std(mean: float, std) -> str:
    """`12.34 ± 0.56`, or `12.34` alone for one seed (std '')."""
    return f"{mean:.2f}" if std == "" or (isinstance(std, float) and math.isnan(std)) else f"{mean:.2f} ± {std:.2f}"


def cell_text(value) -> str:
    """A setting as a cell: true/false, a list as `a+b`, None as empty."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "+".join(map(str, value))
    return "" if value is None else str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """`| a | b |` lines: the header, its rule, one line per row of cells; ends with a newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """CSV of `rows`' `columns` (a header line first), each value spelled by `cell_text`."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: cell_text(row[k]) for k in columns})
    return table.getvalue()
