"""Which runs a leaderboard may compare, and their scores as cells.

    select_comparable   one dtype, budget and data hash, one config per label, one evaluation per task;
                        every run left out is listed with its reason
    score_cells         mean ± 95% CI over seeds (Student-t; one seed: ± stderr) per label and metric
    gap_closed          the share of the untrained -> teacher gap a student closed
    row_labels          the rows of the main and variants tables, in method-registry order
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd

from neobench.evaluation.catalog import SHORT_NAMES, TASKS
from neobench.training.labels import given, label_of

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
    budgets = students.drop_duplicates("run_id")[BUDGET].map(str).agg("|".join, axis=1)
    keys = students[BUDGET].map(str).agg("|".join, axis=1)
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
        sig = group[EVALUATION].map(str).agg("|".join, axis=1)
        top = sorted(sig.value_counts()[lambda c: c == c.max()].index)[0]
        off = group.index[sig != top]
        for run_id in sorted(set(students.loc[off, "run_id"])):
            left_out.append((run_id, f"its {task} scores came from another evaluation (task data, limit or few-shot)"))
        students = students.drop(off)
        ref_sig = references[EVALUATION].map(str).agg("|".join, axis=1)
        references = references[(references["task"] != task) | (ref_sig == top)]
    # One reference row per model and metric (a changed teacher would add a second fingerprint).
    references = references.drop_duplicates(["method", "task", "metric"], keep="first")
    return Selection(students, references, left_out)


# --- scores --------------------------------------------------------------------------------------


def headline_metrics(rows: pd.DataFrame) -> list[tuple[str, str]]:
    """(task, metric) columns of the main table: the suite's tasks in suite order, then others by name."""
    suite_order = {name: i for i, name in enumerate(TASKS)}
    columns = []
    for task in sorted(dict.fromkeys(rows["task"]), key=lambda t: (suite_order.get(t, len(suite_order)), t)):
        metrics = list(dict.fromkeys(rows.loc[rows["task"] == task, "metric"]))
        chosen = HEADLINE.get(task) or (["acc"] if "acc" in metrics else sorted(metrics)[:1])
        columns += [(task, m) for m in chosen if m in metrics]
    return columns


def column_name(task: str, metric: str) -> str:
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
    from neobench.training.methods import METHODS

    order = {name: i for i, name in enumerate(METHODS)}
    runs = sel.students.drop_duplicates("label")
    chosen = []
    for _, r in runs.iterrows():
        default_variant = not given(r["variant"]) or r["variant"] == "lora"
        if adapter_variants and given(r["variant"]) and r["label"] == label_of(r["method"], r["variant"], None):
            chosen.append(r)
        elif not adapter_variants and default_variant:
            chosen.append(r)
    from neobench.models.adapters import VARIANTS

    vorder = {name: i for i, name in enumerate(VARIANTS)}
    chosen.sort(key=lambda r: (order.get(r["method"], len(order)), vorder.get(r["variant"] if given(r["variant"]) else "lora", 0), r["label"]))
    return [r["label"] for r in chosen]


def student_order(labels: list[str]) -> list[str]:
    """Labels in method-registry order (sft, lora, kd, neo, minillm), variants after their method."""
    from neobench.training.methods import METHODS

    order = {name: i for i, name in enumerate(METHODS)}
    return sorted(labels, key=lambda l: (order.get(l.split("+")[0].split(" ")[0], len(order)), l))


def row_labels(sel: Selection) -> tuple[list[str], list[str], list[str]]:
    """Rows of the main table (references first), of the variants table, and every student once."""
    main = [r for r in REFERENCES if (sel.references["method"] == r).any()] + student_labels(sel, adapter_variants=False)
    variants = student_labels(sel, adapter_variants=True)
    if all(v in main for v in variants):  # no variant but plain LoRA: the main table says it all
        variants = []
    return main, variants, [l for l in main if l not in REFERENCES] + [v for v in variants if v not in main]
