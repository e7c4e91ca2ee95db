"""Leaderboards from tidy rows: fair comparisons only, confidence intervals over seeds, tables and plots.

    rows (neobench.results)
      -> select_comparable   one budget and data hash, one config per label, one evaluation per task;
                             every run left out is listed with its reason
      -> main / variants / efficiency tables  (mean ± 95% CI over seeds, Student-t; one seed: ± stderr)
      -> md, csv, html, tex files and PNG plots under leaderboards/<preset>/

Everything here is a pure function of the rows, so the committed leaderboards regenerate
byte for byte from the committed results.jsonl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from neobench.errors import NeobenchError

FORMATS = ("md", "csv", "html", "tex")
REFERENCES = ("teacher", "untrained")
BUDGET = ["steps", "data_hash", "seq_len", "batch_size", "grad_accum"]
"""What every compared run shares. Tokens are compared per seed: a seed sets the example order,
so each seed's runs see the same tokens, while different seeds see different examples."""
EVALUATION = ["task_hash", "limit", "num_fewshot"]
# The suite's headline metrics (perplexity = exp(nll) and acc_norm add nothing to a summary).
HEADLINE = {
    "neo_heldout_nll": ["nll"], "neo_heldout_match": ["acc"], "neo_pydoc_bpb": ["bits_per_byte"],
    "neo_fidelity": ["kl", "top1_agreement"],
}
# What the teacher scores against itself, by definition; neo_fidelity does not score the teacher.
TEACHER_BY_DEFINITION = {("neo_fidelity", "kl"): 0.0, ("neo_fidelity", "top1_agreement"): 1.0}


def given(value) -> bool:
    """Not None/NaN (pandas turns a missing string into NaN)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


OWN_LOSS = {"minillm": "reverse_kl"}
"""Methods whose divergence is part of their definition (not shown in their label)."""


def label_of(method: str, variant: Optional[str], loss: Optional[str]) -> str:
    """sft, kd, lora, neo; neo+dora for other adapter variants; minillm+lora for an adapter
    on a method that can train all weights; "(loss)" for a divergence other than the method's own."""
    from neobench.methods import METHODS

    adapter_only = method in METHODS and METHODS.get(method).trains == "adapter"
    name = method if not given(variant) or (variant == "lora" and adapter_only) else f"{method}+{variant}"
    return name if not given(loss) or loss == OWN_LOSS.get(method, "forward_kl") else f"{name} ({loss})"


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


def score_table(sel: Selection, name: str, title: str, labels: list[str], with_deltas: bool) -> Table:
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
            row[f"{column_name(task, metric)} {arrow}"] = fmt(cell)
            if cell:
                numeric_rows.append({"model": label, "task": task, "metric": metric, "n": cell.n, "mean": cell.mean,
                                     "half_width": cell.half, "interval": cell.kind, "best": cell.best})
        row["gap closed ↑"] = pct(gaps[label])
        if gaps[label]:
            numeric_rows.append({"model": label, "task": "average", "metric": "gap_closed", "n": gaps[label].n,
                                 "mean": gaps[label].mean, "half_width": gaps[label].half, "interval": gaps[label].kind, "best": False})
        if with_deltas:
            for base in ("lora", "kd"):
                ref = gaps.get(base)
                ok = label not in REFERENCES and ref is not None and gaps[label] is not None and label != base
                row[f"Δ vs {'LoRA' if base == 'lora' else 'KD'}"] = f"{100 * (gaps[label].mean - ref.mean):+.1f} pt" if ok else "—"
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


@dataclass
class Report:
    preset: str
    tables: list[Table]
    left_out: list[tuple[str, str]]
    files: list[Path]


def render(
    rows: pd.DataFrame, preset: str, out: Path, formats: tuple[str, ...] = FORMATS, curves: pd.DataFrame | None = None
) -> Report:
    """Write every table (in ``formats``), the plots and README.md for one preset's rows (and training curves)."""
    sel = select_comparable(rows)
    if sel.students.empty:
        raise NeobenchError(f"preset {preset!r} has no comparable trained runs to report")
    main, variants, everyone = row_labels(sel)
    tables = [
        score_table(sel, "main", "Main table", main, with_deltas=True),
        score_table(sel, "variants", "Adapter variants", variants, with_deltas=False),
        efficiency_table(sel, everyone),
    ]
    out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out / "results.csv", index=False)  # the tidy rows again, for spreadsheets
    files = [out / "results.csv"]
    for table in tables:
        if not table.display.empty:
            files += write_table(table, out, formats)
    files += plot(sel, main, everyone, out)
    curve_plot = plot_curves(sel, [l for l in main if l not in REFERENCES], curves, out) if curves is not None else None
    files += [curve_plot] if curve_plot else []
    readme = out / "README.md"
    readme.write_text(leaderboard_markdown(preset, sel, tables, with_curves=curve_plot is not None))
    files.append(readme)
    return Report(preset, tables, sel.left_out, files)


def row_labels(sel: Selection) -> tuple[list[str], list[str], list[str]]:
    """Rows of the main table (references first), of the variants table, and every student once."""
    main = [r for r in REFERENCES if (sel.references["method"] == r).any()] + student_labels(sel, adapter_variants=False)
    variants = student_labels(sel, adapter_variants=True)
    return main, variants, [l for l in main if l not in REFERENCES] + [v for v in variants if v not in main]


def leaderboard_markdown(preset: str, sel: Selection, tables: list[Table], with_curves: bool = False) -> str:
    budget = sel.students.iloc[0]
    runs = sel.students.drop_duplicates("run_id")
    tokens = ", ".join(f"{int(t):,} (seed {s})" for s, t in runs.groupby("seed")["tokens"].first().items())
    parts = [
        f"# Leaderboard: {preset}\n",
        f"Generated by `neobench report` from `results.jsonl` ({len(runs)} runs). Every run here had the same budget: "
        f"{budget['steps']} optimizer steps of batch {budget['batch_size']} × {budget['grad_accum']} micro-batches, "
        f"seq_len {budget['seq_len']}, data hash `{str(budget['data_hash'])[:12]}`; within a seed every method saw "
        f"the same examples in the same order: {tokens} tokens.\n",
        "Cells are mean ± 95% confidence interval over seeds (Student-t); with one seed (and for the reference "
        "rows `teacher` and `untrained`), ± the standard error lm-eval reports. **Bold** marks the best student in a "
        "column. *gap closed* is the share of the distance from the untrained student (0%) to the teacher (100%) "
        "that training covered, averaged over the columns; Δ compares it with LoRA and KD in percentage points.\n",
    ]
    for table in tables:
        if table.display.empty:
            continue
        parts.append(f"## {table.title}\n")
        parts.append(to_markdown(table))
        parts += [f"{note}\n" for note in table.notes]
    parts.append("## Plots\n")
    parts.append("![scores](scores.png)\n\n![gap closed vs peak memory](score_vs_memory.png) ![gap closed vs time](score_vs_time.png)\n")
    if with_curves:
        parts.append(
            "Training curves of the main table's students: the loss each method minimises, its CE and its KD "
            "term per optimizer step (mean over seeds; the band spans the seeds' lowest to highest value).\n\n"
            "![training curves](training_curves.png)\n"
        )
    if sel.left_out:
        parts.append("## Left out\n")
        parts.append("".join(f"- {line}\n" for line in left_out_lines(sel.left_out)))
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
