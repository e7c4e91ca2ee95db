"""Budget curves and the verdict per budget: how each method, and each comparison, moves as training grows.

    rows -> per protocol, per budget (optimizer steps): select_comparable on that budget's runs alone,
            so runs of different budgets never share a cell
         -> budget_points   tidy rows: protocol, budget, label, each headline metric (and the gap closed) as
                            mean and min-max over seeds, beside tokens seen, training seconds and peak memory
         -> verdicts        each main pair (Neo vs LoRA, Neo vs KD, Neo vs SFT, KD vs SFT) at each budget under
                            each protocol: paired Δ NLL [95% CI] on the same test documents, Holm-corrected
                            over the protocol's pairs and budgets; the budget at which the winner changes
         -> budget_curves.png (one per protocol), budgets.csv, verdict.{md,csv,html,tex}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from neobench.reporting.comparisons import per_doc_matrix
from neobench.reporting.paired import Comparison, compare, holm, significance_mark
from neobench.reporting.protocols import Protocol
from neobench.reporting.selection import Selection, column_name, gap_closed, headline_metrics, reference_value, select_comparable
from neobench.reporting.tables import Table

MAIN_PAIRS = (("neo", "lora"), ("neo", "kd"), ("neo", "sft"), ("kd", "sft"))
"""The comparisons the verdict table follows across budgets: LLM-Neo against each baseline, and KD against SFT."""
VERDICT_METRIC = ("neo_heldout_nll", "nll")
"""The verdict's metric: held-out NLL (lower is better), the leaderboard's headline."""
CURVE_LABELS = ("sft", "lora", "kd", "neo")
NAMES = {"neo": "Neo", "lora": "LoRA", "kd": "KD", "sft": "SFT"}


@dataclass
class Budget:
    steps: int
    epoch: bool
    """Whether this budget is one epoch of the training data (E)."""
    selection: Selection

    @property
    def name(self) -> str:
        return f"{self.steps} (E)" if self.epoch else str(self.steps)


SHARED = ["dtype", "data_hash", "seq_len", "batch_size", "grad_accum"]
"""What every run of a budget study shares, whatever its budget (the majority across budgets is kept)."""


def budgets_of(protocol: Protocol) -> tuple[list[Budget], list[tuple[str, str]]]:
    """The protocol's runs of the main methods (sft, lora, kd, neo), one comparable selection per budget (ablation
    trials are not runs of a budget),
    and (run_id, reason) for the runs left out. One dtype, data set and batch across all budgets first,
    so a curve never joins two of them; then each budget is selected on its own."""
    rows = protocol.rows
    students = rows[(rows["model"] == "student") & rows["study"].isna() & rows["label"].isin(CURVE_LABELS)]
    references = rows[rows["model"] != "student"]
    left_out: list[tuple[str, str]] = []
    if students.empty:
        return [], left_out
    keys = students[SHARED].map(str).agg("|".join, axis=1)
    counts = keys[~students["run_id"].duplicated()].value_counts()
    kept = sorted(counts[counts == counts.max()].index)[0]
    for run_id in sorted(set(students.loc[keys != kept, "run_id"])):
        left_out.append((run_id, f"budget curves: another dtype, data set or batch than the study's ({kept.replace('|', ', ')})"))
    students = students[keys == kept]
    references = references[references["dtype"].isna() | (references["dtype"].astype(str) == kept.split("|")[0])]
    found = []
    for steps in sorted(set(students["steps"].astype(int))):
        mine = students[students["steps"].astype(int) == steps]
        sel = select_comparable(pd.concat([references, mine]).drop(columns=["label"]))
        left_out += sel.left_out
        if not sel.students.empty:
            found.append(Budget(steps, bool((sel.students["stopped_by"] == "epoch").all()), sel))
    return found, left_out


POINT_COLUMNS = ["protocol", "budget", "epoch", "label", "task", "metric", "mean", "min", "max", "seeds", "tokens",
                 "train_seconds", "peak_memory_bytes"]


def budget_points(protocol: Protocol, budgets: list[Budget]) -> pd.DataFrame:
    """Tidy: one row per (budget, label, metric): mean, min and max over seeds, seeds, and the three x axes."""
    out = []
    for budget in budgets:
        sel = budget.selection
        columns = headline_metrics(sel.students)
        for label in [l for l in CURVE_LABELS if (sel.students["label"] == l).any()]:
            mine = sel.students[sel.students["label"] == label]
            runs = mine.drop_duplicates("run_id")
            axes = {"tokens": runs["tokens"].mean(), "train_seconds": runs["train_seconds"].mean(),
                    "peak_memory_bytes": runs["peak_memory_bytes"].mean()}
            per_metric = [(task, metric, mine[(mine["task"] == task) & (mine["metric"] == metric)]["value"])
                          for task, metric in columns]
            per_seed_gap = [gap_closed(Selection(sel.students[(sel.students["label"] == label) & (sel.students["seed"] == s)],
                                                 sel.references), label, columns) for s in sorted(set(runs["seed"]))]
            gaps = pd.Series([g.mean for g in per_seed_gap if g is not None], dtype=float)
            for task, metric, values in per_metric + [("gap_closed", "share", gaps)]:
                if values.empty:
                    continue
                out.append({"protocol": protocol.name, "budget": budget.steps, "epoch": budget.epoch, "label": label,
                            "task": task, "metric": metric, "mean": float(values.mean()), "min": float(values.min()),
                            "max": float(values.max()), "seeds": len(values), **axes})
    return pd.DataFrame(out, columns=POINT_COLUMNS)


@dataclass
class Verdict:
    protocol: str
    budget: Budget
    model: str
    baseline: str
    result: Comparison
    p_holm: float = float("nan")

    @property
    def winner(self) -> Optional[str]:
        """The label with the lower NLL where the difference is significant (Holm), else None (a tie)."""
        if not significance_mark(self.p_holm):
            return None
        return self.model if self.result.delta < 0 else self.baseline


def verdicts(protocol: Protocol, budgets: list[Budget], per_doc: Optional[pd.DataFrame]) -> list[Verdict]:
    """Every main pair at every budget where both sides were scored on the same documents; Holm over them all."""
    if per_doc is None or per_doc.empty:
        return []
    found = []
    for budget in budgets:
        for model, baseline in MAIN_PAIRS:
            a = per_doc_matrix(budget.selection, per_doc, model, *VERDICT_METRIC)
            b = per_doc_matrix(budget.selection, per_doc, baseline, *VERDICT_METRIC)
            if a is None or b is None:
                continue
            docs = sorted(set(a.columns) & set(b.columns))
            if docs:
                found.append(Verdict(protocol.name, budget, model, baseline, compare(a[docs].to_numpy(), b[docs].to_numpy())))
    for item, adjusted in zip(found, holm([v.result.p for v in found])):
        item.p_holm = adjusted
    return found


def crossing(items: list[Verdict]) -> str:
    """One pair under one protocol, budgets ascending: who wins where, and the budget where the winner changes."""
    model, baseline = NAMES.get(items[0].model, items[0].model), NAMES.get(items[0].baseline, items[0].baseline)
    winners = [(v.budget.name, v.winner) for v in sorted(items, key=lambda v: v.budget.steps)]
    said = "; ".join(f"{b}: {NAMES.get(w, w) if w else 'tie'}" for b, w in winners)
    significant = [(b, w) for b, w in winners if w]
    changes = [(prev, cur) for prev, cur in zip(significant, significant[1:]) if prev[1] != cur[1]]
    if changes:
        turn = ", then ".join(f"from {NAMES.get(p[1], p[1])} to {NAMES.get(c[1], c[1])} at budget {c[0]}" for p, c in changes)
        return f"{model} vs {baseline}: the winner changes {turn} ({said})."
    if significant:
        return f"{model} vs {baseline}: {NAMES.get(significant[0][1], significant[0][1])} wins wherever the difference is significant ({said})."
    return f"{model} vs {baseline}: no significant difference at any budget ({said})."


def verdict_table(by_protocol: dict[str, list[Verdict]]) -> Table:
    """One row per (pair, budget); per protocol its Δ NLL [95% CI] with Holm's mark and the winner."""
    from neobench.reporting.tables import fmt_delta  # Paired's formatter reads .metric and .result

    @dataclass
    class _AsPaired:
        metric: str
        result: Comparison
        p_holm: float

    display, numeric, notes = {}, [], []
    for protocol, items in by_protocol.items():
        for v in items:
            key = (MAIN_PAIRS.index((v.model, v.baseline)), v.budget.steps)
            row = display.setdefault(key, {"pair": f"{NAMES[v.model]} vs {NAMES[v.baseline]}", "budget (steps)": v.budget.name})
            row[f"{protocol}: Δ NLL [95% CI]"] = fmt_delta(_AsPaired(VERDICT_METRIC[1], v.result, v.p_holm))
            row[f"{protocol}: winner"] = NAMES.get(v.winner, "tie") if v.winner else "tie"
            r = v.result
            numeric.append({"protocol": protocol, "model": v.model, "baseline": v.baseline, "budget": v.budget.steps,
                            "epoch": v.budget.epoch, "task": VERDICT_METRIC[0], "metric": VERDICT_METRIC[1], "delta": r.delta,
                            "low": r.low, "high": r.high, "p": r.p, "p_holm": v.p_holm, "winner": v.winner or "tie",
                            "n_docs": r.n_docs, "seeds": r.seeds[0], "baseline_seeds": r.seeds[1]})
        for pair in MAIN_PAIRS:
            mine = [v for v in items if (v.model, v.baseline) == pair]
            if mine:
                notes.append(f"{protocol}: {crossing(mine)}")
    columns = ["pair", "budget (steps)"] + [f"{p}: {c}" for p in by_protocol for c in ("Δ NLL [95% CI]", "winner")]
    # A budget one protocol did not train shows a dash in that protocol's columns.
    frame = pd.DataFrame([display[k] for k in sorted(display)], columns=columns, dtype=object).fillna("—")
    notes.insert(0, "Δ NLL = model − baseline on the same test documents (negative: the model is better), paired-bootstrap "
                    "95% interval over documents (and seeds where a budget has several); * marks p < 0.05 after Holm's "
                    "correction over all of one protocol's pairs and budgets. winner: the lower NLL where significant, "
                    "else tie. Each budget's runs have their own schedule (10% warm-up, cosine decay to the end of that "
                    "budget): a smaller budget is never a prefix of a larger one.")
    return Table("verdict", "Verdict per budget (held-out NLL)", pd.DataFrame(numeric), frame, notes)


AXES = (("tokens", "tokens seen", 1.0, True), ("train_seconds", "training time (s)", 1.0, True),
        ("peak_memory_bytes", "peak memory (GiB)", 2.0**30, False))


def plot_budget_curves(points: pd.DataFrame, references: Selection, protocol: str, out: Path) -> Optional[Path]:
    """budget_curves[_tuned].png: every test metric (rows) against tokens, time and memory (columns); one line per
    method through its budgets (mean over seeds, band: the seeds' min to max); teacher and untrained dashed."""
    import matplotlib.pyplot as plt

    from neobench.reporting.plots import _save

    mine = points[points["protocol"] == protocol] if not points.empty else points
    if mine.empty or mine["budget"].nunique() < 2:
        return None
    metrics = list(dict.fromkeys(zip(mine["task"], mine["metric"])))
    fig, grid = plt.subplots(len(metrics), len(AXES), figsize=(11, 2.3 * len(metrics)), squeeze=False)
    for r, (task, metric) in enumerate(metrics):
        for c, (axis, xlabel, scale, log) in enumerate(AXES):
            ax = grid[r][c]
            for i, label in enumerate(CURVE_LABELS):
                line = mine[(mine["label"] == label) & (mine["task"] == task) & (mine["metric"] == metric)].sort_values(axis)
                if line.empty:
                    continue
                x = line[axis] / scale
                ax.plot(x, line["mean"], marker="o", ms=3, lw=1.3, color=f"C{i}", label=NAMES[label])
                ax.fill_between(x, line["min"], line["max"], color=f"C{i}", alpha=0.15, lw=0)
            for who, style in (("teacher", "--"), ("untrained", ":")):
                value = 1.0 if task == "gap_closed" and who == "teacher" else 0.0 if task == "gap_closed" else reference_value(
                    references, who, task, metric)
                if value is not None and math.isfinite(value):
                    ax.axhline(value, color="grey", ls=style, lw=0.9, label=who if r == 0 and c == 0 else None)
            if log:  # plain numbers at a few ticks: log-scale labels such as 3x10^1 overlap
                from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if r == len(metrics) - 1:
                ax.set_xlabel(xlabel, fontsize=8)
            if c == 0:
                ax.set_ylabel("gap closed" if task == "gap_closed" else column_name(task, metric), fontsize=8)
    grid[0][0].legend(fontsize=7)
    fig.suptitle(f"Test metrics against training budget ({protocol} protocol)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return _save(fig, out / ("budget_curves.png" if protocol == "paper" else f"budget_curves_{protocol}.png"))


@dataclass
class BudgetReport:
    points: pd.DataFrame
    verdict: Table
    plots: list[Path]
    budgets: dict[str, list[Budget]]
    left_out: list[tuple[str, str]]


def budget_report(protocols: list[Protocol], per_doc: Optional[pd.DataFrame], out: Path, draw: bool = True) -> Optional[BudgetReport]:
    """Points, verdicts and plots for every protocol with runs at two budgets or more (None: no such protocol)."""
    by_budget, left_out = {}, []
    for p in protocols:
        budgets, dropped = budgets_of(p)
        if len(budgets) >= 2:
            by_budget[p.name] = budgets
            left_out += dropped
    if not by_budget:
        return None
    points = pd.concat([budget_points(p, by_budget[p.name]) for p in protocols if p.name in by_budget], ignore_index=True)
    found = {p.name: verdicts(p, by_budget[p.name], per_doc) for p in protocols if p.name in by_budget}
    plots = []
    if draw:
        for name, budgets in by_budget.items():
            refs = budgets[-1].selection
            drawn = plot_budget_curves(points, Selection(refs.students, refs.references), name, out)
            plots += [drawn] if drawn else []
    return BudgetReport(points, verdict_table(found), plots, by_budget, left_out)
