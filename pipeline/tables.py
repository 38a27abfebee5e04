"""The report's tables as one structure, written three ways: Markdown, CSV and LaTeX (booktabs).

A ``Table`` holds text cells already formatted (numbers with their intervals); each writer only lays
them out, so the three files of a table always say the same thing.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

# LaTeX's special characters (escaped first: the backslash), then the few non-ASCII signs the report uses,
# as math so that the table compiles with pdflatex and no extra package beyond booktabs.
_LATEX = [("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"), ("_", r"\_"),
          ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}")]
_LATEX_SIGNS = {"·": r"$\cdot$", "±": r"$\pm$", "†": r"$^\dagger$", "Δ": r"$\Delta$", "²": r"$^2$", "≥": r"$\geq$",
                "≤": r"$\leq$", "−": "-", "×": r"$\times$"}


@dataclass
class Table:
    """``header`` (k,) and ``rows`` (m, k) of text; ``align``: one of l/r per column; ``notes``: lines under it."""

    name: str  # file stem: table_<name>.csv / .tex
    title: str
    header: list[str]
    rows: list[list[str]]
    align: str
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        widths = {len(self.header), len(self.align), *(len(r) for r in self.rows)}
        if len(widths) != 1:
            raise ValueError(f"table {self.name}: header, align and rows differ in length ({sorted(widths)})")


def markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table under a ``####`` title, with its notes after it."""
    rule = ["---:" if a == "r" else "---" for a in table.align]
    lines = [f"#### {table.title}", "", _md_row(table.header), _md_row(rule)]
    lines += [_md_row(r) for r in table.rows]
    lines += ["", *table.notes] if table.notes else []
    return "\n".join(lines) + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def to_csv(table: Table) -> str:
    """The header and rows as CSV (the notes are not data: they stay in the Markdown and LaTeX)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table.header)
    writer.writerows(table.rows)
    return out.getvalue()


def latex_escape(text: str) -> str:
    out = "".join(next((new for old, new in _LATEX if ch == old), ch) for ch in text)
    return "".join(_LATEX_SIGNS.get(ch, ch) for ch in out)


def latex(table: Table) -> str:
    """A booktabs ``tabular`` (``\\toprule``, ``\\midrule``, ``\\bottomrule``) inside a ``table`` float with its
    caption; needs ``\\usepackage{booktabs}``."""
    def row(cells):
        return " & ".join(latex_escape(c) for c in cells) + r" \\"

    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{latex_escape(table.title)}}}",
             rf"\label{{tab:{table.name}}}", rf"\begin{{tabular}}{{{table.align}}}", r"\toprule", row(table.header), r"\midrule"]
    lines += [row(r) for r in table.rows]
    lines.append(r"\bottomrule")
    lines.append(r"\end{tabular}")
    if table.notes:
        lines.append(r"\par\smallskip\footnotesize " + r" \\ ".join(latex_escape(n) for n in table.notes))
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
