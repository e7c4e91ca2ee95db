"""The leaderboard's tables: scores, paired comparisons, efficiency and generation, as Table objects.

Each Table holds a numeric long form (for csv) and formatted display cells ("**" marks a best
entry); neobench.reporting.formats writes them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd

from neobench.reporting.comparisons import BASELINES, Paired
from neobench.reporting.paired import significance_mark
from neobench.reporting.selection import REFERENCES, Cell, Selection, column_name, gap_closed, headline_metrics, score_cells

DELTA_METRIC = ("neo_heldout_nll", "nll")
"""The metric of the main table's Δ columns (every headline metric is in the paired table)."""
DELTA_METRIC_ACROSS_VOCABULARIES = ("neo_heldout_bpb", "bits_per_byte")
"""The Δ columns' metric on a board without NLL (smol-cpu-xvocab scores bits per byte instead)."""
DELTA_COLUMNS = ("lora", "kd")
"""The baselines of the main table's Δ columns."""
GENERATION = [("neo_heldout_rougeL", "rougeL"), ("neo_heldout_rougeL", "response_tokens"), ("neo_heldout_rougeL", "at_cap")]


def delta_metric(columns) -> tuple[str, str]:
    """The main table's Δ metric among a board's (task, metric) columns: NLL, else bits per byte."""
    return DELTA_METRIC if DELTA_METRIC in columns or DELTA_METRIC_ACROSS_VOCABULARIES not in columns else DELTA_METRIC_ACROSS_VOCABULARIES


@dataclass
class Table:
    name: str
    title: str
    numeric: pd.DataFrame
    """Long numeric form (for csv)."""
    display: pd.DataFrame
    """Formatted cells; "**" marks a best entry (each writer renders it)."""
    notes: list[str] = field(default_factory=list)


def fmt(cell: Optional[Cell], digits: int = 3) -> str:
    if cell is None:
        return "—"
    text = f"{cell.mean:.{digits}f}"
    if not math.isnan(cell.half):
        text += f" ± {cell.half:.{digits}f}"
    return f"**{text}**" if cell.best else text


def pct(cell: Optional[Cell]) -> str:
    if cell is None:
        return "—"
    text = f"{100 * cell.mean:.1f}%"
    if not math.isnan(cell.half):
        text = f"{100 * cell.mean:.1f} ± {100 * cell.half:.1f}%"
    return text


def metric_digits(metric: str) -> int:
    return 2 if metric in ("rougeL", "response_tokens") else 3


def fmt_delta(item: Paired, turned: bool = False) -> str:
    """"+0.012 [+0.004, +0.020]*"; ``turned``: the comparison read the other way round (baseline - model)."""
    d, r = metric_digits(item.metric), item.result
    delta, low, high = (-r.delta, -r.high, -r.low) if turned else (r.delta, r.low, r.high)
    return f"{delta:+.{d}f} [{low:+.{d}f}, {high:+.{d}f}]{significance_mark(item.p_holm)}"


def fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else "<0.001"


def paired_table(name: str, title: str, comparisons: list[Paired]) -> Table:
    """One row per comparison: Δ with its paired 95% interval, the p-value, Holm's, and the test."""
    display_rows, numeric_rows = [], []
    for c in comparisons:
        r = c.result
        display_rows.append({
            "model": c.model, "vs": BASELINES[c.baseline], "metric": column_name(c.task, c.metric),
            "Δ [95% CI]": fmt_delta(c), "p": fmt_p(r.p), "p (Holm)": fmt_p(c.p_holm), "test": r.test,
            "docs × seeds": f"{r.n_docs} × {r.seeds[0]}/{r.seeds[1]}",
        })
        numeric_rows.append({"model": c.model, "baseline": c.baseline, "task": c.task, "metric": c.metric, "delta": r.delta,
                             "low": r.low, "high": r.high, "p": r.p, "p_holm": c.p_holm, "test": r.test,
                             "significant": bool(significance_mark(c.p_holm)), "n_docs": r.n_docs,
                             "seeds": r.seeds[0], "baseline_seeds": r.seeds[1]})
    notes = ["Δ = model − baseline in the metric's units (for ↓ metrics such as NLL, negative is better), the mean "
             "over documents of the paired difference; 95% paired-bootstrap interval (10,000 draws resampling documents, "
             "and seeds where there are several). p: the bootstrap's two-sided p-value, or exact McNemar for a 0/1 "
             "metric of single runs. Holm's correction runs over every comparison in this table; * marks p (Holm) < 0.05."]
    return Table(name, title, pd.DataFrame(numeric_rows), pd.DataFrame(display_rows), notes)


def score_table(sel: Selection, name: str, title: str, labels: list[str], paired: list[Paired] = ()) -> Table:
    columns = headline_metrics(pd.concat([sel.students, sel.references]))
    cells = score_cells(sel, labels, columns)
    hib = {(t, m): bool(sel.students.loc[(sel.students["task"] == t) & (sel.students["metric"] == m), "higher_is_better"].iloc[0])
           for t, m in columns if ((sel.students["task"] == t) & (sel.students["metric"] == m)).any()}
    for task, metric in columns:  # the best student entry of each column
        entries = [(cells[(l, task, metric)].mean, l) for l in labels if l not in REFERENCES and (l, task, metric) in cells]
        if entries and (task, metric) in hib:
            best = max(entries) if hib[(task, metric)] else min(entries)
            cells[(best[1], task, metric)].best = True
    gaps = {label: gap_closed(sel, label, columns) for label in labels}
    display_rows, numeric_rows = [], []
    for label in labels:
        seeds = max((c.n for (l, _, _), c in cells.items() if l == label), default=0)
        row = {"model": label, "seeds": "ref" if label in REFERENCES else str(seeds)}
        for task, metric in columns:
            cell = cells.get((label, task, metric))
            arrow = "↑" if hib.get((task, metric), True) else "↓"
            row[f"{column_name(task, metric)} {arrow}"] = fmt(cell, metric_digits(metric))
            if cell:
                numeric_rows.append({"model": label, "task": task, "metric": metric, "n": cell.n, "mean": cell.mean,
                                     "half_width": cell.half, "interval": cell.kind, "best": cell.best})
        row["gap closed ↑"] = pct(gaps[label])
        if gaps[label]:
            numeric_rows.append({"model": label, "task": "average", "metric": "gap_closed", "n": gaps[label].n,
                                 "mean": gaps[label].mean, "half_width": gaps[label].half, "interval": gaps[label].kind, "best": False})
        if paired:
            task, metric = delta_metric(columns)
            arrow = "↑" if hib.get((task, metric), False) else "↓"
            for base, base_name in ((b, BASELINES[b]) for b in DELTA_COLUMNS):
                hit = [c for c in paired if (c.model, c.baseline, c.task, c.metric) == (label, base, task, metric)]
                mirror = [c for c in paired if (c.model, c.baseline, c.task, c.metric) == (base, label, task, metric)]
                cell = fmt_delta(hit[0]) if hit else fmt_delta(mirror[0], turned=True) if mirror else "—"
                row[f"Δ {column_name(task, metric)} vs {base_name} {arrow}"] = cell
        display_rows.append(row)
    return Table(name, title, pd.DataFrame(numeric_rows), pd.DataFrame(display_rows))


def efficiency_table(sel: Selection, labels: list[str]) -> Table:
    """Cost per label (mean over seeds), absolute and relative to KD."""
    runs = sel.students.drop_duplicates("run_id")
    stats = {}
    for label in labels:
        r = runs[runs["label"] == label]
        if len(r):
            stats[label] = {
                "trainable_params": r["trainable_params"].mean(), "peak_memory_bytes": r["peak_memory_bytes"].mean(),
                "train_seconds": r["train_seconds"].mean(), "tokens_per_second": r["tokens_per_second"].mean(),
                "seeds": len(r), "memory_kind": r["memory_kind"].iloc[0], "device": r["device"].iloc[0],
            }
    kd = stats.get("kd")

    def rel(label: str, key: str) -> str:
        if not kd or label == "kd":
            return "—"
        return f"{100 * (stats[label][key] / kd[key] - 1):+.0f}%"

    display_rows, numeric_rows = [], []
    for label, s in stats.items():
        display_rows.append({
            "model": label, "seeds": str(s["seeds"]), "trainable": f"{s['trainable_params'] / 1e6:.2f}M",
            "peak memory": f"{s['peak_memory_bytes'] / 2**30:.2f} GiB", "vs KD (mem)": rel(label, "peak_memory_bytes"),
            "train time": f"{s['train_seconds']:.0f} s", "vs KD (time)": rel(label, "train_seconds"),
            "tokens/s": f"{s['tokens_per_second']:.0f}", "vs KD (tok/s)": rel(label, "tokens_per_second"),
        })
        numeric_rows.append({"model": label, **s})
    notes = []
    if stats:
        first = next(iter(stats.values()))
        kind = {"rss": "peak RSS of the training process (CPU)", "cuda_max_allocated": "CUDA max allocated"}.get(first["memory_kind"], first["memory_kind"])
        notes.append(f"Peak memory is the {kind} during training; train time is the training loop alone (no loading, no evaluation).")
    return Table("efficiency", "Efficiency", pd.DataFrame(numeric_rows), pd.DataFrame(display_rows), notes)


def generation_table(sel: Selection, name: str, title: str, labels: list[str]) -> Table:
    """ROUGE-L with the answers' mean length and the share that hit the token cap, per label."""
    cells = score_cells(sel, labels, GENERATION)
    display_rows, numeric_rows = [], []
    for label in labels:
        if not any((label, t, m) in cells for t, m in GENERATION):
            continue
        row = {"model": label}
        for task, metric in GENERATION:
            cell = cells.get((label, task, metric))
            if metric == "at_cap":  # descriptive: means over seeds, without intervals
                row["at cap"] = "—" if cell is None else f"{100 * cell.mean:.0f}%"
            elif metric == "response_tokens":
                row["length (tokens)"] = "—" if cell is None else f"{cell.mean:.1f}"
            else:
                row["ROUGE-L ↑"] = fmt(cell, metric_digits(metric))
            if cell:
                numeric_rows.append({"model": label, "task": task, "metric": metric, "n": cell.n, "mean": cell.mean,
                                     "half_width": cell.half, "interval": cell.kind})
        display_rows.append(row)
    notes = ["Each student answers the held-out prompts itself (greedy, at most 128 new tokens, stopped at the end of its "
             "turn); ROUGE-L is the F-measure (×100, stemmed) of its answer against the teacher's response. *length*: the "
             "answers' mean length in tokens; *at cap*: the share still going at 128 tokens (both means over seeds)."]
    return Table(name, title, pd.DataFrame(numeric_rows), pd.DataFrame(display_rows), notes)
