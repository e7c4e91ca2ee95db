"""Paired comparisons of the stored rows: each student vs LoRA, KD and SFT on the same documents.

The statistics are neobench.reporting.paired's (pure functions on arrays); this module picks the
pairs, lines up each label's per-document scores by seed, and applies Holm's correction per table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pandas as pd

from neobench.reporting.paired import Comparison, compare, holm
from neobench.reporting.selection import REFERENCES, Selection, headline_metrics

BASELINES = {"lora": "LoRA", "kd": "KD", "sft": "SFT"}
"""What every student row is compared with, on the same documents (the paired tables)."""


@dataclass
class Paired:
    model: str
    baseline: str
    task: str
    metric: str
    result: Comparison
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
