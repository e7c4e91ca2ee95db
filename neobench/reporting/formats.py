"""Writing a Table to files: markdown, csv, html and LaTeX."""

from __future__ import annotations

import re
from pathlib import Path

from neobench.reporting.tables import Table

FORMATS = ("md", "csv", "html", "tex")


def to_markdown(table: Table) -> str:
    return table.display.to_markdown(index=False, colalign=["left"] + ["right"] * (table.display.shape[1] - 1)) + "\n"


def to_html(table: Table) -> str:
    body = table.display.to_html(index=False, border=0, escape=True)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", body) + "\n"


def to_tex(table: Table) -> str:
    def cell(text: str) -> str:
        text = text.replace("\\", "\\textbackslash{}").replace("%", "\\%").replace("_", "\\_").replace("&", "\\&")
        text = text.replace("±", "$\\pm$").replace("↑", "$\\uparrow$").replace("↓", "$\\downarrow$").replace("Δ", "$\\Delta$")
        return re.sub(r"\*\*(.+?)\*\*", r"\\textbf{\1}", text)

    frame = table.display.map(cell)
    frame.columns = [cell(c) for c in frame.columns]
    return frame.to_latex(index=False, escape=False, column_format="l" + "r" * (frame.shape[1] - 1))


def write_table(table: Table, out: Path, formats: tuple[str, ...]) -> list[Path]:
    written = []
    for fmt_name in formats:
        path = out / f"{table.name}.{fmt_name}"
        if fmt_name == "md":
            path.write_text(to_markdown(table))
        elif fmt_name == "html":
            path.write_text(to_html(table))
        elif fmt_name == "tex":
            path.write_text(to_tex(table))
        else:
            table.numeric.to_csv(path, index=False, float_format="%.6g")
        written.append(path)
    return written
