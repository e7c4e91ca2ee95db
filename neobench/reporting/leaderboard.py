"""Leaderboards from tidy rows: fair comparisons only, confidence intervals over seeds, tables and plots.

    rows (neobench.runs.results)
      -> select_comparable   one budget and data hash, one config per label, one evaluation per task;
                             every run left out is listed with its reason
      -> split_protocols     paper (every method at its family's preset rate) and tuned (each method
                             at the rate the tune-lr study chose on the validation split): never mixed
      -> main / variants / efficiency tables  (mean ± 95% CI over seeds, Student-t; one seed: ± stderr)
      -> paired comparisons  each student vs LoRA, KD and SFT on the same documents (neobench.reporting.paired),
                             Holm-corrected within a table
      -> md, csv, html, tex files and PNG plots under leaderboards/<preset>/

Each step has its own module (selection, protocols, comparisons, tables, formats, plots); this one
runs them (render) and writes the README. Everything here is a pure function of the rows, so the
committed leaderboards regenerate byte for byte from the committed results.jsonl (with per_doc.csv
and curves.jsonl).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from neobench.core.errors import NeobenchError
from neobench.reporting.comparisons import paired_comparisons
from neobench.reporting.formats import FORMATS, to_markdown, write_table
from neobench.reporting.plots import plot, plot_curves
from neobench.reporting.protocols import PROTOCOL_TEXT, Protocol, budget_line, split_protocols, tuning_table
from neobench.reporting.selection import REFERENCES, Selection, row_labels, select_comparable
from neobench.reporting.tables import Table, efficiency_table, generation_table, paired_table, score_table


@dataclass
class Section:
    protocol: Protocol
    selection: Selection
    tables: list[Table]


@dataclass
class Report:
    preset: str
    tables: list[Table]
    left_out: list[tuple[str, str]]
    files: list[Path]
    sections: list[Section] = field(default_factory=list)

    def table(self, name: str) -> Table:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(f"no table {name!r}; tables: {', '.join(t.name for t in self.tables)}")


def render(
    rows: pd.DataFrame, preset: str, out: Path, formats: tuple[str, ...] = FORMATS, curves: pd.DataFrame | None = None,
    per_doc: pd.DataFrame | None = None,
) -> Report:
    """Write every table (in ``formats``), the plots and README.md for one preset's rows (and training curves,
    and per-document scores for the paired comparisons)."""
    protocols, left_out = split_protocols(rows)
    sections = []
    for protocol in protocols:
        sel = select_comparable(protocol.rows.drop(columns=["label"]))
        if sel.students.empty:
            if protocol.name == "paper":
                raise NeobenchError(f"preset {preset!r} has no comparable trained runs to report")
            continue
        main, variants, everyone = row_labels(sel)
        suffix = "" if protocol.name == "paper" else "_tuned"
        heading = "" if protocol.name == "paper" else " (tuned protocol)"
        main_paired = paired_comparisons(sel, main, per_doc)
        variant_paired = paired_comparisons(sel, variants, per_doc)
        tables = [
            score_table(sel, f"main{suffix}", f"Main table{heading}", main, main_paired),
            paired_table(f"paired{suffix}", f"Paired comparisons, main table{heading}", main_paired),
            score_table(sel, f"variants{suffix}", f"Adapter variants{heading}", variants, variant_paired),
            paired_table(f"paired_variants{suffix}", f"Paired comparisons, adapter variants{heading}", variant_paired),
            generation_table(sel, f"generation{suffix}", f"Generation{heading}", [l for l in main if l not in REFERENCES] + [
                v for v in variants if v not in main]),
        ]
        if protocol.name == "paper":
            tables.append(efficiency_table(sel, everyone))
        else:
            tables.insert(0, tuning_table(rows))
        sections.append(Section(protocol, sel, tables))
    paper = sections[0]
    used = {run for section in sections for run in section.selection.students["run_id"]}
    left = {(r, why) for section in sections for r, why in section.selection.left_out if r not in used}
    left_out = sorted(left | set(left_out))
    out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out / "results.csv", index=False)  # the tidy rows again, for spreadsheets
    files = [out / "results.csv"]
    tables = [t for section in sections for t in section.tables]
    for table in tables:
        if not table.display.empty:
            files += write_table(table, out, formats)
    main, _, everyone = row_labels(paper.selection)
    files += plot(paper.selection, main, everyone, out)
    curve_plot = plot_curves(paper.selection, [l for l in main if l not in REFERENCES], curves, out) if curves is not None else None
    files += [curve_plot] if curve_plot else []
    readme = out / "README.md"
    readme.write_text(leaderboard_markdown(preset, sections, left_out, with_curves=curve_plot is not None))
    files.append(readme)
    return Report(preset, tables, left_out, files, sections)


def leaderboard_markdown(preset: str, sections: list[Section], left_out: list[tuple[str, str]], with_curves: bool = False) -> str:
    total = len({r for s in sections for r in s.selection.students["run_id"]})
    parts = [
        f"# Leaderboard: {preset}\n",
        f"Generated by `neobench report` from `results.jsonl` and `per_doc.csv` ({total} runs). Every student is scored on "
        "the test split of the held-out data (the validation split is for tuning, see the data card).\n",
        "Cells are mean ± 95% confidence interval over seeds (Student-t); with one seed (and for the reference "
        "rows `teacher` and `untrained`), ± the standard error lm-eval reports. **Bold** marks the best student in a "
        "column. *gap closed* is the share of the distance from the untrained student (0%) to the teacher (100%) "
        "that training covered, averaged over the columns. The Δ columns compare each student's NLL with LoRA's and KD's "
        "on the same documents: paired difference [95% paired-bootstrap interval], * where significant after Holm's "
        "correction over the table's comparisons (the paired tables below list every metric).\n",
    ]
    for section in sections:
        title = {"paper": "Paper protocol", "tuned": "Tuned protocol"}[section.protocol.name]
        parts.append(f"## {title}\n")
        parts.append(PROTOCOL_TEXT[section.protocol.name] + " " + budget_line(section.selection, section.protocol))
        for table in section.tables:
            if table.display.empty:
                continue
            parts.append(f"### {table.title}\n")
            parts.append(to_markdown(table))
            parts += [f"{note}\n" for note in table.notes]
    parts.append("## Plots (paper protocol)\n")
    parts.append("![scores](scores.png)\n\n![gap closed vs peak memory](score_vs_memory.png) ![gap closed vs time](score_vs_time.png)\n")
    if with_curves:
        parts.append(
            "Training curves of the main table's students: the loss each method minimises, its CE and its KD "
            "term per optimizer step (mean over seeds; the band spans the seeds' lowest to highest value).\n\n"
            "![training curves](training_curves.png)\n"
        )
    if left_out:
        parts.append("## Left out\n")
        parts.append("".join(f"- {line}\n" for line in left_out_lines(left_out)))
    return "\n".join(parts)


def left_out_lines(left_out: list[tuple[str, str]], markdown: bool = True) -> list[str]:
    """One line per run left out, but one per study for ablation trials (a study has many)."""
    trials: dict[str, int] = {}
    lines = []
    for run_id, reason in sorted(left_out):
        if reason.startswith("ablation trial ("):
            study = reason.removeprefix("ablation trial (").split(" #")[0]
            trials[study] = trials.get(study, 0) + 1
        else:
            lines.append(f"`{run_id}`: {reason}" if markdown else f"{run_id}: {reason}")
    for study, n in sorted(trials.items()):
        table = f"ablations/{study}.md"
        lines.append(f"{n} trial run(s) of the ablation `{study}`: see [{table}]({table})" if markdown
                     else f"{n} trial run(s) of the ablation {study}: see {table}")
    return lines
