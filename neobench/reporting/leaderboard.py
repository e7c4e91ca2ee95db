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
      -> with runs at several budgets: budget curves and the verdict per budget (neobench.reporting.budgets);
         the tables above stay at the preset's own budget

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
from neobench.reporting.budgets import BudgetReport, budget_report
from neobench.reporting.comparisons import paired_comparisons
from neobench.reporting.formats import FORMATS, to_markdown, write_table
from neobench.reporting.plots import plot, plot_curves
from neobench.reporting.protocols import PROTOCOL_TEXT, Protocol, budget_line, split_protocols, tuning_table
from neobench.reporting.selection import REFERENCES, Selection, row_labels, select_comparable
from neobench.reporting.tables import DELTA_METRIC, Table, delta_metric, efficiency_table, generation_table, paired_table, score_table
from neobench.reporting.vocabularies import own_student, vocabulary_table


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
    budgets: BudgetReport | None = None

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
    all_rows, vocabularies = rows, None
    own = own_student(rows, preset)
    if own is not None and rows.loc[rows["model"] == "student", "student"].nunique() > 1:
        # Students of another vocabulary: in the cross-vocabulary table only (at the preset's budget);
        # the usual tables are the own student's.
        vocabularies = vocabulary_table(at_budget(rows, preset_budget(rows, preset)), per_doc, own)
        own_untrained = (rows["model"] != "untrained_student") | (rows["student"] == own)
        rows = rows[((rows["model"] != "student") & own_untrained) | (rows["student"] == own)]
    protocols, left_out = split_protocols(rows)
    main_steps = preset_budget(rows, preset)
    sections = []
    for protocol in protocols:
        sel = select_comparable(at_budget(protocol.rows, main_steps).drop(columns=["label"]))
        if sel.students.empty:
            if protocol.name == "paper":
                raise NeobenchError(f"preset {preset!r} has no comparable trained runs to report")
            # No tuned run at the tables' budget yet: the search itself is still shown (its runs may be in the curves).
            sections.append(Section(protocol, sel, [tuning_table(rows)]))
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
    out.mkdir(parents=True, exist_ok=True)
    budgets = budget_report(protocols, per_doc, out)
    used = {run for section in sections for run in section.selection.students["run_id"]}
    if budgets is not None:
        used |= {run for runs in budgets.budgets.values() for b in runs for run in b.selection.students["run_id"]}
    left = {(r, why) for section in sections for r, why in section.selection.left_out if r not in used}
    if budgets is not None:
        left |= {(r, why) for r, why in budgets.left_out if r not in used}
    if main_steps is not None:  # runs at another budget that no budget curve shows either
        listed = {r for r, _ in left}
        other = rows[(rows["model"] == "student") & rows["study"].isna() & (rows["steps"] != main_steps)]
        left |= {(r, f"budget {s} steps: the tables show the preset's {main_steps}, and no budget curve takes it")
                 for r, s in zip(other["run_id"], other["steps"]) if r not in used and r not in listed}
    left_out = sorted(left | set(left_out))
    all_rows.to_csv(out / "results.csv", index=False)  # the tidy rows again, for spreadsheets
    files = [out / "results.csv"]
    tables = [t for section in sections for t in section.tables]
    if vocabularies is not None:
        tables.append(vocabularies)
    if budgets is not None:
        tables.append(budgets.verdict)
        budgets.points.to_csv(out / "budgets.csv", index=False)
        files += [out / "budgets.csv", *budgets.plots]
    for table in tables:
        if not table.display.empty:
            files += write_table(table, out, formats)
    main, _, everyone = row_labels(paper.selection)
    files += plot(paper.selection, main, everyone, out)
    curve_plot = plot_curves(paper.selection, [l for l in main if l not in REFERENCES], curves, out) if curves is not None else None
    files += [curve_plot] if curve_plot else []
    readme = out / "README.md"
    readme.write_text(leaderboard_markdown(preset, sections, left_out, with_curves=curve_plot is not None, budgets=budgets,
                                           main_steps=main_steps, vocabularies=vocabularies))
    files.append(readme)
    return Report(preset, tables, left_out, files, sections, budgets)


def preset_budget(rows: pd.DataFrame, preset: str) -> int | None:
    """The optimizer steps of the preset's own budget, which the main tables show (None: the runs' most common one).

    A preset of one epoch (max_steps 0) means the steps its epoch-long runs took. Runs of an unknown
    preset, or none at the preset's budget, keep the most common budget.
    """
    from neobench.runs.config import PRESETS, load_preset

    if preset not in PRESETS:
        return None
    steps = load_preset(preset).max_steps
    students = rows[(rows["model"] == "student") & rows["study"].isna()]
    if steps == 0:
        epochs = students.loc[students["stopped_by"] == "epoch", "steps"]
        return int(epochs.max()) if len(epochs) else None
    return steps if (students["steps"] == steps).any() else None


def at_budget(rows: pd.DataFrame, steps: int | None) -> pd.DataFrame:
    """References, ablation trials, and the students trained for ``steps`` (None: every student)."""
    if steps is None:
        return rows
    keep = (rows["model"] != "student") | rows["study"].notna() | (rows["steps"] == steps)
    return rows[keep]


def leaderboard_markdown(preset: str, sections: list[Section], left_out: list[tuple[str, str]], with_curves: bool = False,
                         budgets: BudgetReport | None = None, main_steps: int | None = None,
                         vocabularies: Table | None = None) -> str:
    students = pd.concat([s.selection.students for s in sections]) if sections else pd.DataFrame(columns=["task", "metric"])
    delta_name = "NLL" if delta_metric(set(zip(students["task"], students["metric"]))) == DELTA_METRIC else "bits per byte"
    total = len({r for s in sections for r in s.selection.students["run_id"]} | (
        {r for runs in budgets.budgets.values() for b in runs for r in b.selection.students["run_id"]} if budgets else set()))
    parts = [
        f"# Leaderboard: {preset}\n",
        f"Generated by `neobench report` from `results.jsonl` and `per_doc.csv` ({total} runs). Every student is scored on "
        "the test split of the held-out data (the validation split is for tuning, see the data card).\n",
        "Cells are mean ± 95% confidence interval over seeds (Student-t); with one seed (and for the reference "
        "rows `teacher` and `untrained`), ± the standard error lm-eval reports. **Bold** marks the best student in a "
        "column. *gap closed* is the share of the distance from the untrained student (0%) to the teacher (100%) "
        f"that training covered, averaged over the columns. The Δ columns compare each student's {delta_name} with LoRA's and KD's "
        "on the same documents: paired difference [95% paired-bootstrap interval], * where significant after Holm's "
        "correction over the table's comparisons (the paired tables below list every metric).\n",
    ]
    for section in sections:
        title = {"paper": "Paper protocol", "tuned": "Tuned protocol"}[section.protocol.name]
        parts.append(f"## {title}\n")
        if section.selection.students.empty:
            at = f" at the preset's {main_steps} steps" if main_steps else ""
            parts.append(PROTOCOL_TEXT[section.protocol.name] + f" No run of this protocol{at} yet: its runs at other "
                         "budgets are in the budget curves and the verdict below.\n")
        else:
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
    if vocabularies is not None:
        parts.append(f"## {vocabularies.title}\n")
        parts.append("The tables above are the preset's own student's. Here every student of the board, whatever its "
                     "vocabulary, on the scores that do not count tokens (neobench/reporting/vocabularies.py).\n")
        parts.append(to_markdown(vocabularies))
        parts += [f"{note}\n" for note in vocabularies.notes]
    if budgets is not None:
        parts.append(budget_markdown(budgets))
    if left_out:
        parts.append("## Left out\n")
        parts.append("".join(f"- {line}\n" for line in left_out_lines(left_out)))
    return "\n".join(parts)


def budget_markdown(budgets: BudgetReport) -> str:
    """The README's budget section: what was trained at which budget, the curves, and the verdict table."""
    parts = ["## Budget curves and the verdict per budget\n"]
    for name, runs in budgets.budgets.items():
        steps = ", ".join(b.name for b in runs)
        seeds = ", ".join(f"{b.name}: {b.selection.students['seed'].nunique()}" for b in runs)
        epoch = " (E: one epoch)" if any(b.epoch for b in runs) else ""
        parts.append(f"{name.capitalize()} protocol: budgets of {steps} optimizer steps{epoch}; seeds per budget {seeds}.\n")
    parts.append("Each budget's runs are trained from scratch with their own schedule (10% warm-up, then cosine decay to "
                 "the end of that budget), never a prefix of a longer run. `budgets.csv` holds every point (mean, min and "
                 "max over seeds, with tokens seen, training seconds and peak memory).\n")
    for path in budgets.plots:
        parts.append(f"![{path.stem}]({path.name})\n")
    parts.append(f"### {budgets.verdict.title}\n")
    if budgets.verdict.display.empty:
        parts.append("No per-document scores (per_doc.csv) for these runs, so no paired verdict.\n")
    else:
        parts.append(to_markdown(budgets.verdict))
        parts += [f"{note}\n" for note in budgets.verdict.notes]
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
