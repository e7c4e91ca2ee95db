"""Leaderboards from tidy rows: fair comparisons only, confidence intervals over seeds, tables and plots.

    rows (neobench.results)
      -> select_comparable   one budget and data hash, one config per label, one evaluation per task;
                             every run left out is listed with its reason
      -> split_protocols     paper (every method at its family's preset rate) and tuned (each method
                             at the rate the tune-lr study chose on the validation split): never mixed
      -> main / variants / efficiency tables  (mean ± 95% CI over seeds, Student-t; one seed: ± stderr)
      -> paired comparisons  each student vs LoRA and vs KD on the same documents (neobench.paired),
                             Holm-corrected within a table
      -> md, csv, html, tex files and PNG plots under leaderboards/<preset>/

Everything here is a pure function of the rows, so the committed leaderboards regenerate
byte for byte from the committed results.jsonl (with per_doc.csv and curves.jsonl).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from neobench.errors import NeobenchError
from neobench.labels import given, label_of

FORMATS = ("md", "csv", "html", "tex")
REFERENCES = ("teacher", "untrained")
BUDGET = ["steps", "data_hash", "seq_len", "batch_size", "grad_accum"]
"""What every compared run shares. Tokens are compared per seed: a seed sets the example order,
so each seed's runs see the same tokens, while different seeds see different examples."""
EVALUATION = ["task_hash", "limit", "num_fewshot"]
# The suite's headline metrics (perplexity = exp(nll) and acc_norm add nothing to a summary).
HEADLINE = {
    "neo_heldout_nll": ["nll"], "neo_heldout_match": ["acc"], "neo_pydoc_bpb": ["bits_per_byte"],
    "neo_heldout_rougeL": ["rougeL"], "neo_heldout_rougeL_sampled": ["rougeL"], "neo_fidelity": ["kl", "top1_agreement"],
}
DELTA_METRIC = ("neo_heldout_nll", "nll")
"""The metric of the main table's Δ columns (every headline metric is in the paired table)."""
BASELINES = {"lora": "LoRA", "kd": "KD", "sft": "SFT"}
"""What every student row is compared with, on the same documents (the paired tables)."""
DELTA_COLUMNS = ("lora", "kd")
"""The baselines of the main table's Δ columns."""
GENERATION = [("neo_heldout_rougeL", "rougeL"), ("neo_heldout_rougeL", "response_tokens"), ("neo_heldout_rougeL", "at_cap")]
# What the teacher scores against itself, by definition; neo_fidelity does not score the teacher.
TEACHER_BY_DEFINITION = {("neo_fidelity", "kl"): 0.0, ("neo_fidelity", "top1_agreement"): 1.0}


def t_quantile(n: int) -> float:
    """Two-sided 95% Student-t quantile with n - 1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def interval(values: list[float], stderr: Optional[float]) -> tuple[float, float, str]:
    """(mean, half-width, kind): 95% Student-t CI over seeds; with one seed, lm-eval's stderr."""
    n = len(values)
    mean = sum(values) / n
    if n >= 2:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        return mean, t_quantile(n) * sd / math.sqrt(n), "ci95"
    return mean, (stderr if stderr is not None and not pd.isna(stderr) else float("nan")), "stderr"


# --- choosing what may be compared -----------------------------------------------------------


@dataclass
class Selection:
    students: pd.DataFrame
    references: pd.DataFrame
    left_out: list[tuple[str, str]] = field(default_factory=list)
    """(run_id, reason) of every run not in the tables."""


def select_comparable(rows: pd.DataFrame) -> Selection:
    """Keep only runs that can be compared fairly (rows of one preset)."""
    students = rows[rows["model"] == "student"].copy()
    references = rows[rows["model"] != "student"].copy()
    left_out: list[tuple[str, str]] = []

    def drop(mask: pd.Series, reason) -> None:
        nonlocal students
        for run_id, group in students[mask].groupby("run_id", sort=True):
            left_out.append((run_id, reason(group.iloc[0]) if callable(reason) else reason))
        students = students[~mask]

    drop(students["study"].notna(), lambda r: f"ablation trial ({r['study']} #{r['trial']}); see ablations/")
    if students.empty:
        return Selection(students, references, left_out)

    # One dtype: bf16 and fp32 runs differ in more than their method, so they never share a table.
    # The dtype most runs used is kept (ties: the name sorting first), with the references scored in it.
    dtypes = students.drop_duplicates("run_id")["dtype"].astype(str).value_counts()
    kept_dtype = sorted(dtypes[dtypes == dtypes.max()].index)[0]
    drop(students["dtype"].astype(str) != kept_dtype,
         lambda r: f"dtype {r['dtype']} vs {kept_dtype}: runs of different dtypes are not compared")
    # Reference rows written before they carried a dtype (null) were all fp32 runs' references.
    references = references[references["dtype"].isna() | (references["dtype"].astype(str) == kept_dtype)]

    # One budget: the one most runs share (ties broken by the key itself, so the choice is stable).
    budgets = students.drop_duplicates("run_id")[BUDGET].astype(str).agg("|".join, axis=1)
    keys = students[BUDGET].astype(str).agg("|".join, axis=1)
    counts = budgets.value_counts()
    chosen = sorted(counts[counts == counts.max()].index)[0]
    ref_budget = dict(zip(BUDGET, chosen.split("|")))
    drop(keys != chosen, lambda r: "budget differs: " + ", ".join(
        f"{k} {r[k]} vs {ref_budget[k]}" for k in BUDGET if str(r[k]) != ref_budget[k]))

    # Within a seed every method saw the same examples in the same order, hence the same tokens.
    runs = students.drop_duplicates("run_id")
    usual = {seed: group["tokens"].mode().min() for seed, group in runs.groupby("seed")}
    drop(students["tokens"] != students["seed"].map(usual),
         lambda r: f"tokens differ from the other seed-{r['seed']} runs: {r['tokens']} vs {usual[r['seed']]}")

    # One configuration per label (e.g. one rank for neo+dora); then the newest run of each seed.
    students["label"] = [label_of(m, v, l) for m, v, l in zip(students["method"], students["variant"], students["loss"])]
    runs = students.drop_duplicates("run_id")
    per_config = runs.groupby(["label", "config_key"]).size().reset_index(name="n")
    per_config = per_config.sort_values(["label", "n", "config_key"], ascending=[True, False, True])
    keep_config = set(per_config.drop_duplicates("label")[["label", "config_key"]].itertuples(index=False, name=None))
    drop(~pd.Series([(l, c) in keep_config for l, c in zip(students["label"], students["config_key"])], index=students.index),
         lambda r: f"other hyperparameters than the {r['label']} runs shown (config {r['config_key']})")
    newest = set(students.sort_values("run_id").drop_duplicates(["label", "seed"], keep="last")["run_id"])
    drop(~students["run_id"].isin(newest), lambda r: f"superseded by a newer {r['label']} run with seed {r['seed']}")

    # One evaluation per task: the task hash, limit and few-shot count most student rows share.
    for task, group in list(students.groupby("task")):
        sig = group[EVALUATION].astype(str).agg("|".join, axis=1)
        top = sorted(sig.value_counts()[lambda c: c == c.max()].index)[0]
        off = group.index[sig != top]
        for run_id in sorted(set(students.loc[off, "run_id"])):
            left_out.append((run_id, f"its {task} scores came from another evaluation (task data, limit or few-shot)"))
        students = students.drop(off)
        ref_sig = references[EVALUATION].astype(str).agg("|".join, axis=1)
        references = references[(references["task"] != task) | (ref_sig == top)]
    # One reference row per model and metric (a changed teacher would add a second fingerprint).
    references = references.drop_duplicates(["method", "task", "metric"], keep="first")
    return Selection(students, references, left_out)


# --- tables ------------------------------------------------------------------------------------


def headline_metrics(rows: pd.DataFrame) -> list[tuple[str, str]]:
    """(task, metric) columns of the main table: the suite's tasks in suite order, then others by name."""
    from neobench.evaluation import TASKS

    suite_order = {name: i for i, name in enumerate(TASKS)}
    columns = []
    for task in sorted(dict.fromkeys(rows["task"]), key=lambda t: (suite_order.get(t, len(suite_order)), t)):
        metrics = list(dict.fromkeys(rows.loc[rows["task"] == task, "metric"]))
        chosen = HEADLINE.get(task) or (["acc"] if "acc" in metrics else sorted(metrics)[:1])
        columns += [(task, m) for m in chosen if m in metrics]
    return columns


def column_name(task: str, metric: str) -> str:
    from neobench.evaluation import SHORT_NAMES

    return SHORT_NAMES.get((task, metric), f"{task} {metric}")


@dataclass
class Cell:
    mean: float
    half: float
    kind: str
    n: int
    best: bool = False


def score_cells(sel: Selection, labels: list[str], columns: list[tuple[str, str]]) -> dict[tuple[str, str, str], Cell]:
    """(label, task, metric) -> Cell, for students (over seeds) and references (one evaluation)."""
    cells = {}
    for label in labels:
        if label in REFERENCES:
            rows = sel.references[sel.references["method"] == label]
        else:
            rows = sel.students[sel.students["label"] == label]
        for task, metric in columns:
            hit = rows[(rows["task"] == task) & (rows["metric"] == metric)]
            if hit.empty:
                continue
            stderr = hit["stderr"].iloc[0] if len(hit) == 1 else None
            mean, half, kind = interval(list(hit["value"]), stderr)
            cells[(label, task, metric)] = Cell(mean, half, kind, len(hit))
    return cells


def reference_value(sel: Selection, who: str, task: str, metric: str) -> Optional[float]:
    if who == "teacher" and (task, metric) in TEACHER_BY_DEFINITION:
        return TEACHER_BY_DEFINITION[(task, metric)]
    hit = sel.references[(sel.references["method"] == who) & (sel.references["task"] == task) & (sel.references["metric"] == metric)]
    return float(hit["value"].iloc[0]) if len(hit) else None


def gap_closed(sel: Selection, label: str, columns: list[tuple[str, str]]) -> Optional[Cell]:
    """Share of the untrained -> teacher gap the student closed, averaged over the columns (per seed, then CI).

    0 = the untrained student, 1 = the teacher; the direction of each metric cancels out.
    """
    if label in REFERENCES:
        return Cell(1.0 if label == "teacher" else 0.0, float("nan"), "exact", 1)
    rows = sel.students[sel.students["label"] == label]
    per_seed = []
    for _, seed_rows in rows.groupby("seed"):
        shares = []
        for task, metric in columns:
            hit = seed_rows[(seed_rows["task"] == task) & (seed_rows["metric"] == metric)]
            lo, hi = reference_value(sel, "untrained", task, metric), reference_value(sel, "teacher", task, metric)
            if hit.empty or lo is None or hi is None or hi == lo:
                continue
            shares.append((float(hit["value"].iloc[0]) - lo) / (hi - lo))
        if shares:
            per_seed.append(sum(shares) / len(shares))
    if not per_seed:
        return None
    mean, half, kind = interval(per_seed, None)
    return Cell(mean, half, kind if len(per_seed) > 1 else "exact", len(per_seed))


def student_labels(sel: Selection, adapter_variants: bool) -> list[str]:
    """Labels in method-registry order; main table: default variant, variants table: adapter methods."""
    from neobench.methods import METHODS

    order = {name: i for i, name in enumerate(METHODS)}
    runs = sel.students.drop_duplicates("label")
    chosen = []
    for _, r in runs.iterrows():
        default_variant = not given(r["variant"]) or r["variant"] == "lora"
        if adapter_variants and given(r["variant"]) and r["label"] == label_of(r["method"], r["variant"], None):
            chosen.append(r)
        elif not adapter_variants and default_variant:
            chosen.append(r)
    from neobench.adapters import VARIANTS

    vorder = {name: i for i, name in enumerate(VARIANTS)}
    chosen.sort(key=lambda r: (order.get(r["method"], len(order)), vorder.get(r["variant"] if given(r["variant"]) else "lora", 0), r["label"]))
    return [r["label"] for r in chosen]


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


# --- paired comparisons ---------------------------------------------------------------------------


@dataclass
class Paired:
    model: str
    baseline: str
    task: str
    metric: str
    result: "Comparison"
    p_holm: float = float("nan")


def per_doc_matrix(sel: Selection, per_doc: pd.DataFrame, label: str, task: str, metric: str) -> Optional[pd.DataFrame]:
    """A label's per-document scores: one row per seed (ascending), one column per document."""
    runs = sel.students[sel.students["label"] == label].drop_duplicates("run_id").sort_values("seed")
    mine = per_doc[(per_doc["task"] == task) & (per_doc["metric"] == metric) & per_doc["run_id"].isin(set(runs["run_id"]))]
    if mine.empty or mine["run_id"].nunique() < len(runs):
        return None
    table = mine.pivot(index="run_id", columns="doc", values="value").reindex(list(runs["run_id"]))
    return table.dropna(axis=1)


def paired_comparisons(sel: Selection, labels: list[str], per_doc: Optional[pd.DataFrame]) -> list[Paired]:
    """Every student of ``labels`` against each baseline (LoRA, KD, SFT) on every headline metric,
    each pair once, with Holm's adjustment over all of them (one family per table)."""
    from neobench.paired import compare, holm

    if per_doc is None or per_doc.empty:
        return []
    columns = headline_metrics(sel.students)
    present = set(sel.students["label"])
    found = []
    for label in labels:
        for base in BASELINES:
            if label in REFERENCES or label == base or base not in present:
                continue
            if label in BASELINES and any((f.model, f.baseline) == (base, label) for f in found):
                continue  # kd vs LoRA is lora vs KD turned round (lora vs SFT is sft vs LoRA): counted once
            for task, metric in columns:
                a = per_doc_matrix(sel, per_doc, label, task, metric)
                b = per_doc_matrix(sel, per_doc, base, task, metric)
                if a is None or b is None:
                    continue
                docs = sorted(set(a.columns) & set(b.columns))
                if docs:
                    found.append(Paired(label, base, task, metric, compare(a[docs].to_numpy(), b[docs].to_numpy())))
    for item, adjusted in zip(found, holm([f.result.p for f in found])):
        item.p_holm = adjusted
    return found


def metric_digits(metric: str) -> int:
    return 2 if metric in ("rougeL", "response_tokens") else 3


def fmt_delta(item: Paired, turned: bool = False) -> str:
    """"+0.012 [+0.004, +0.020]*"; ``turned``: the comparison read the other way round (baseline - model)."""
    from neobench.paired import significance_mark

    d, r = metric_digits(item.metric), item.result
    delta, low, high = (-r.delta, -r.high, -r.low) if turned else (r.delta, r.low, r.high)
    return f"{delta:+.{d}f} [{low:+.{d}f}, {high:+.{d}f}]{significance_mark(item.p_holm)}"


def fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else "<0.001"


def paired_table(name: str, title: str, comparisons: list[Paired]) -> Table:
    """One row per comparison: Δ with its paired 95% interval, the p-value, Holm's, and the test."""
    from neobench.paired import significance_mark

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
            task, metric = DELTA_METRIC
            arrow = "↑" if hib.get(DELTA_METRIC, False) else "↓"
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


# --- writing -----------------------------------------------------------------------------------


def to_markdown(table: Table) -> str:
    return table.display.to_markdown(index=False, colalign=["left"] + ["right"] * (table.display.shape[1] - 1)) + "\n"


def to_html(table: Table) -> str:
    import re

    body = table.display.to_html(index=False, border=0, escape=True)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", body) + "\n"


def to_tex(table: Table) -> str:
    import re

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


def plot(sel: Selection, main: list[str], everyone: list[str], out: Path) -> list[Path]:
    """scores.png (headline metrics with intervals) and the gap closed against memory and time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = headline_metrics(pd.concat([sel.students, sel.references]))
    cells = score_cells(sel, main, columns)
    paths = []
    fig, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns), 0.45 * len(main) + 1.4), sharey=True, squeeze=False)
    for ax, (task, metric) in zip(axes[0], columns):
        ys, xs, errs, colors = [], [], [], []
        for i, label in enumerate(main):
            cell = cells.get((label, task, metric))
            if cell:
                ys.append(i)
                xs.append(cell.mean)
                errs.append(0 if math.isnan(cell.half) else cell.half)
                colors.append("0.55" if label in REFERENCES else "C0")
        ax.errorbar(xs, ys, xerr=errs, fmt="none", ecolor="0.3", capsize=3)
        ax.scatter(xs, ys, c=colors, zorder=3)
        ax.set_title(column_name(task, metric), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(main)), main)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    paths.append(_save(fig, out / "scores.png"))

    for key, xlabel, scale, name in SCATTERS:
        fig, _ = scatter(sel, everyone, columns, key, xlabel, scale)
        paths.append(_save(fig, out / name))
    return paths


def plot_curves(sel: Selection, labels: list[str], curves: pd.DataFrame, out: Path) -> Path | None:
    """training_curves.png: loss, CE and KD per step for each label, mean over its seeds with a min-max band."""
    import matplotlib.pyplot as plt

    runs = sel.students.drop_duplicates("run_id")[["run_id", "label"]]
    data = curves.merge(runs, on="run_id")
    drawn = [l for l in labels if (data["label"] == l).any()]
    if not drawn:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharex=True)
    for i, label in enumerate(drawn):
        mine = data[data["label"] == label]
        for ax, column in zip(axes, ("loss", "ce", "kd")):
            per_step = mine.dropna(subset=[column]).groupby("step")[column].agg(["mean", "min", "max"])
            if per_step.empty:
                continue
            steps = per_step.index.astype(int)
            ax.plot(steps, per_step["mean"], color=f"C{i}", label=label, lw=1.4)
            ax.fill_between(steps, per_step["min"], per_step["max"], color=f"C{i}", alpha=0.15, lw=0)
    for ax, title in zip(axes, ("loss (the objective)", "CE on response tokens", "KD term")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out / "training_curves.png")


SCATTERS = [
    ("peak_memory_bytes", "peak memory during training (GiB)", 2**30, "score_vs_memory.png"),
    ("train_seconds", "training time (s)", 1, "score_vs_time.png"),
]


def scatter(sel: Selection, everyone: list[str], columns, key: str, xlabel: str, scale: float):
    """Gap closed (with its interval) against a cost column, every point labelled; -> (figure, labels)."""
    import matplotlib.pyplot as plt

    runs = sel.students.drop_duplicates("run_id")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    points = []
    for label in everyone:
        gap = gap_closed(sel, label, columns)
        r = runs[runs["label"] == label]
        if gap is None or r.empty:
            continue
        x = r[key].mean() / scale
        ax.errorbar([x], [100 * gap.mean], yerr=[0 if math.isnan(gap.half) else 100 * gap.half], fmt="o", capsize=3, color="C0")
        points.append((x, 100 * gap.mean, label))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("gap closed, untrained → teacher (%)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.2, y=0.15)  # room for the labels of the outermost points
    fig.tight_layout()  # before placing labels: it moves the axes, and with them the points
    return fig, label_points(ax, points)


# Where a label may sit relative to its point: (dx, dy) directions, then alignment. Tried in this
# order, at growing distances, so the same rows always give the same picture.
LABEL_SPOTS = [
    (1, 1, "left", "bottom"), (1, -1, "left", "top"), (-1, 1, "right", "bottom"), (-1, -1, "right", "top"),
    (0, 1, "center", "bottom"), (0, -1, "center", "top"), (1, 0, "left", "center"), (-1, 0, "right", "center"),
    (2, 1, "left", "bottom"), (2, -1, "left", "top"), (-2, 1, "right", "bottom"), (-2, -1, "right", "top"),
    (1, 2, "left", "bottom"), (1, -2, "left", "top"), (-1, 2, "right", "bottom"), (-1, -2, "right", "top"),
]


def label_points(ax, points: list[tuple[float, float, str]], fontsize: int = 8, step: float = 5.0) -> list:
    """Annotate each (x, y, label) so that every point can be told apart.

    A label may cover no other label or point and must stay inside the axes; a leader line
    (drawn beyond the first ring) may cross no label, point or other leader line. Candidates lie
    around the point at 1, 2, ... steps (in points, 1/72 inch); the first free one wins. If none is
    free, the least bad is taken, where covering a label or point counts ten crossed lines.
    """
    from matplotlib.path import Path as Line
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pad = 4.0  # pixels of clearance around a point's marker
    marks = [ax.transData.transform((x, y)) for x, y, _ in points]
    boxes = [Bbox.from_extents(px - pad, py - pad, px + pad, py + pad) for px, py in marks]
    leaders: list = []
    annotations = []
    for (x, y, label), own, (px, py) in zip(points, list(boxes), marks):
        best = None
        for ring in range(1, 21):
            for dx, dy, ha, va in LABEL_SPOTS:
                note = ax.annotate(
                    label, (x, y), xytext=(dx * step * ring, dy * step * ring), textcoords="offset points",
                    ha=ha, va=va, fontsize=fontsize,
                    arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6, "shrinkA": 1, "shrinkB": 3} if ring > 1 else None,
                )
                note.update_positions(renderer)
                box = Text.get_window_extent(note, renderer).padded(1)  # the text, not its leader line
                leader = Line([(px, py), (box.x0 + box.width / 2, box.y0 + box.height / 2)]) if ring > 1 else None
                clashes = 10 * sum(box.overlaps(other) for other in boxes if other is not own)
                clashes += 10 * (not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1))
                if leader is not None:
                    clashes += sum(leader.intersects_bbox(other) for other in boxes if other is not own)
                    clashes += sum(leader.intersects_path(other) for other in leaders)
                if best is None or clashes < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (clashes, note, box, leader)
                else:
                    note.remove()
                if clashes == 0:
                    break
            if best[0] == 0:
                break
        boxes.append(best[2])
        if best[3] is not None:
            leaders.append(best[3])
        annotations.append(best[1])
    return annotations


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    # No "Software" stamp and a fixed dpi: the same rows give the same bytes.
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


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


# --- protocols -------------------------------------------------------------------------------


@dataclass
class Protocol:
    name: str
    """"paper" or "tuned"."""
    rows: pd.DataFrame
    """The references and the students of this protocol (ablation trials kept: they are listed as left out)."""
    lr_scales: dict[str, float]
    """label -> lr_scale: 1 for every label under "paper", the study's choice under "tuned"."""


def with_labels(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.copy()
    rows["label"] = [label_of(m, v, l) for m, v, l in zip(rows["method"], rows["variant"], rows["loss"])]
    rows["lr_scale"] = rows["lr_scale"].astype(float).fillna(1.0)
    return rows


def tuned_choice(trials: pd.DataFrame) -> dict[str, float]:
    """label -> the lr_scale with the lowest validation NLL among ``tuning_trials``, for labels whose search
    is complete (as many rates tried as the most-tried label): a half-finished study chooses nothing yet."""
    from neobench.protocols import best_lr_scales

    return best_lr_scales(list(zip(trials["label"], trials["lr_scale"], trials["value"])), minimize=True)


def tuning_trials(rows: pd.DataFrame) -> pd.DataFrame:
    """The tuning studies' trial rows of their objective (validation NLL), one per trial."""
    from neobench.protocols import TUNING_STUDIES

    students = rows[(rows["model"] == "student") & rows["study"].isin(TUNING_STUDIES)]
    return students[(students["task"] == "neo_heldout_nll") & (students["metric"] == "nll")]


def split_protocols(rows: pd.DataFrame) -> tuple[list[Protocol], list[tuple[str, str]]]:
    """The paper protocol (lr_scale 1) and, when the rows hold the tune-lr study, the tuned one;
    plus (run_id, reason) for every trained run in neither."""
    rows = with_labels(rows)
    is_student = rows["model"] == "student"
    trial = is_student & rows["study"].notna()
    references = rows[~is_student]
    trained = rows[is_student & ~trial]
    paper = Protocol("paper", pd.concat([references, rows[trial], trained[trained["lr_scale"] == 1.0]]),
                     dict.fromkeys(trained["label"], 1.0))
    protocols = [paper]
    chosen = tuned_choice(tuning_trials(rows))
    in_tuned = pd.Series(False, index=trained.index)
    if chosen:
        in_tuned = trained["label"].map(chosen).eq(trained["lr_scale"])
        protocols.append(Protocol("tuned", pd.concat([references, trained[in_tuned]]), chosen))
    neither = trained[(trained["lr_scale"] != 1.0) & ~in_tuned].drop_duplicates("run_id")
    left_out = [(r["run_id"], f"lr_scale {r['lr_scale']:g}: neither the paper protocol's 1 nor the tuned choice"
                 + (f" {chosen[r['label']]:g}" if r["label"] in chosen else f" (no tuning study tuned {r['label']})"))
                for _, r in neither.iterrows()]
    return protocols, left_out


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


def tuning_table(rows: pd.DataFrame) -> Table:
    """The tune-lr study: validation NLL of every method at every lr_scale it tried; bold: the choice."""
    trials = tuning_trials(with_labels(rows))
    chosen = tuned_choice(trials)
    scales = sorted(set(trials["lr_scale"]))
    display_rows, numeric_rows = [], []
    for label in student_order(list(dict.fromkeys(trials["label"]))):
        mine = trials[trials["label"] == label]
        row = {"model": label}
        for scale in scales:
            hit = mine[mine["lr_scale"] == scale]
            text = "—" if hit.empty else f"{hit['value'].min():.3f}"
            row[f"×{scale:g}"] = f"**{text}**" if scale == chosen.get(label) else text
            for _, r in hit.iterrows():
                numeric_rows.append({"model": label, "lr_scale": scale, "lr": r["lr"], "validation_nll": r["value"],
                                     "chosen": scale == chosen.get(label), "trial": r["trial"]})
        display_rows.append(row)
    notes = ["Held-out NLL ↓ on the validation split (never the test split the tables score) after the same budget, one "
             "seed, for each multiple of the method's preset learning rate; **bold** is the multiple the tuned protocol "
             "uses (the lowest NLL; a method whose search is not finished has none yet). Made by "
             + " and ".join(f"`neobench ablate {name}` (ablations/{name}.yaml)" for name in sorted(set(trials["study"]))) + "."]
    at_edge = grid_edge_choices(trials, chosen)
    if at_edge:
        notes.append("At the edge of the grid: " + "; ".join(
            f"{', '.join(labels)} chose the {edge} multiple tried (×{scale:g})" for (edge, scale), labels in at_edge.items())
            + ". Their best rate may lie beyond it, so for them the tuned protocol is a lower bound on what tuning gives.")
    return Table("tuning", "Learning-rate search (validation split)", pd.DataFrame(numeric_rows), pd.DataFrame(display_rows), notes)


def grid_edge_choices(trials: pd.DataFrame, chosen: dict[str, float]) -> dict[tuple[str, float], list[str]]:
    """(("largest" or "smallest", lr_scale) -> labels) for the choices at the end of the multiples a label tried."""
    edges: dict[tuple[str, float], list[str]] = {}
    for label in student_order(list(chosen)):
        tried = trials.loc[trials["label"] == label, "lr_scale"]
        if len(set(tried)) < 2:
            continue
        for edge, end in (("largest", tried.max()), ("smallest", tried.min())):
            if chosen[label] == end:
                edges.setdefault((edge, float(end)), []).append(label)
    return edges


def student_order(labels: list[str]) -> list[str]:
    """Labels in method-registry order (sft, lora, kd, neo, minillm), variants after their method."""
    from neobench.methods import METHODS

    order = {name: i for i, name in enumerate(METHODS)}
    return sorted(labels, key=lambda l: (order.get(l.split("+")[0].split(" ")[0], len(order)), l))


def row_labels(sel: Selection) -> tuple[list[str], list[str], list[str]]:
    """Rows of the main table (references first), of the variants table, and every student once."""
    main = [r for r in REFERENCES if (sel.references["method"] == r).any()] + student_labels(sel, adapter_variants=False)
    variants = student_labels(sel, adapter_variants=True)
    if all(v in main for v in variants):  # no variant but plain LoRA: the main table says it all
        variants = []
    return main, variants, [l for l in main if l not in REFERENCES] + [v for v in variants if v not in main]


def budget_line(sel: Selection, protocol: Protocol) -> str:
    budget = sel.students.iloc[0]
    runs = sel.students.drop_duplicates("run_id")
    tokens = ", ".join(f"{int(t):,} (seed {s})" for s, t in runs.groupby("seed")["tokens"].first().items())
    by_rate: dict[float, list[str]] = {}
    for label in student_order(list(dict.fromkeys(runs["label"]))):
        by_rate.setdefault(float(runs.loc[runs["label"] == label, "lr"].iloc[0]), []).append(
            label + (f" (×{protocol.lr_scales[label]:g})" if protocol.name == "tuned" else ""))
    rates = "; ".join(f"{lr:.3g} for {', '.join(labels)}" for lr, labels in sorted(by_rate.items()))
    return (
        f"Budget: {budget['steps']} optimizer steps of batch {budget['batch_size']} × {budget['grad_accum']} micro-batches, "
        f"seq_len {budget['seq_len']}, computed in {budget['dtype']}, data hash `{str(budget['data_hash'])[:12]}`; within a "
        f"seed every method saw the same "
        f"examples in the same order: {tokens} tokens. Learning rates: {rates}.\n"
    )


PROTOCOL_TEXT = {
    "paper": "Every method at its family's fixed learning rate (the preset's: full fine-tuning `lr`, adapters `adapter_lr` "
             "= 10 × `lr`), as the LLM-Neo paper compares them.",
    "tuned": "Every method at its own best learning rate: the tune-lr study (and tune-lr-variants, for LLM-Neo's "
             "adapter variants) tried 4 multiples of the preset rate per method on the validation split (one seed), "
             "and each method here trains at its best multiple over the "
             "seeds shown, scored on the test split like the paper protocol. A method whose best multiple is 1 shows "
             "the paper protocol's runs again.",
}


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
