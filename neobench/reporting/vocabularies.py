"""Students with different vocabularies side by side: the cross-vocabulary table.

A board whose runs train more than one student (e.g. smol-cpu-xvocab's 16k-token student and the
49k-token pruned student of smol-cpu, trained with the same budget on the same examples) gets
its usual tables for its own student (the one most runs train) and this one table for all:

    rows      one per (student, method): its scores on the tasks that compare any two
              vocabularies (bits per byte, response match, ROUGE-L), its cost, and the paired
              Δ against LLM-Neo on the other vocabulary, on the same documents
    fairness  the same optimizer steps, batch, sequence length and dtype, and the same examples
              in the same order (``examples_hash``: the chat-formatted texts, whatever tokenizer
              cut them); a run that differs is left out with its reason

Token-level scores (NLL, perplexity) and teacher-student fidelity count tokens of one
vocabulary, so they are not in this table.
"""

from __future__ import annotations

from typing import Optional

import pandas as pd

from neobench.reporting.paired import compare, holm, significance_mark
from neobench.reporting.tables import Table
from neobench.training.labels import label_of

CROSS_METRICS = [
    ("neo_heldout_bpb", "bits_per_byte", "BPB"), ("neo_heldout_rougeL", "rougeL", "ROUGE-L"),
    ("neo_heldout_match", "acc", "match"), ("neo_pydoc_bpb", "bits_per_byte", "pydoc BPB"),
]
"""(task, metric, column): scores that do not depend on the tokenizer."""
PAIRED = [("neo_heldout_bpb", "bits_per_byte"), ("neo_heldout_rougeL", "rougeL")]
"""The metrics of the Δ columns (paired bootstrap over documents, Holm over the table)."""
SAME_BUDGET = ["steps", "batch_size", "grad_accum", "seq_len", "examples_hash", "seed", "dtype", "kd_ratio", "temperature"]
"""What every row of the table shares: the budget, the examples and their order, the precision, the KD mixture."""


def own_student(rows: pd.DataFrame, preset: Optional[str] = None) -> Optional[str]:
    """The board's own student: its preset's, if runs train it; else the one most runs train (ties: the
    spec sorting first); None for rows without students."""
    if "student" not in rows or rows["student"].isna().all():
        return None
    runs = rows[(rows["model"] == "student") & rows["study"].isna()].drop_duplicates("run_id")
    if preset is not None:
        from neobench.runs.config import PRESETS, load_preset

        if preset in PRESETS and (runs["student"] == load_preset(preset).student).any():
            return load_preset(preset).student
    counts = runs["student"].value_counts()
    return sorted(counts[counts == counts.max()].index)[0] if len(counts) else None


def vocabulary_table(rows: pd.DataFrame, per_doc: Optional[pd.DataFrame], own: str) -> Optional[Table]:
    """The cross-vocabulary table of a board's rows at one budget (None if every run trains ``own``)."""
    students = rows[(rows["model"] == "student") & rows["study"].isna()].copy()
    if students["student"].nunique() < 2:
        return None
    students["label"] = [label_of(m, v, l) for m, v, l in zip(students["method"], students["variant"], students["loss"])]
    runs = students.sort_values("run_id").drop_duplicates("run_id")
    notes_out = []
    unknown = runs["examples_hash"].isna()
    for run_id in runs.loc[unknown, "run_id"]:
        notes_out.append(f"{run_id}: no examples_hash (made before runs recorded it), so not shown")
    runs = runs[~unknown]
    if runs.empty:
        return None
    seed = int(runs["seed"].min())
    ref = runs[(runs["student"] == own) & (runs["seed"] == seed)]
    ref = (ref if len(ref) else runs[runs["seed"] == seed]).iloc[0]
    same = (runs[SAME_BUDGET].astype(str) == ref[SAME_BUDGET].astype(str)).all(axis=1)
    for _, r in runs[~same].iterrows():
        off = [f"{k} {r[k]} vs {ref[k]}" for k in SAME_BUDGET if str(r[k]) != str(ref[k])]
        notes_out.append(f"{r['run_id']}: not shown ({', '.join(off)})")
    # One run per (student, label): the newest, so every row is one training run of the same seed.
    runs = runs[same].sort_values("run_id", ascending=False).drop_duplicates(["student", "label"])
    order = sorted(runs.itertuples(index=False), key=lambda r: (r.student != own, r.student, r.label))
    # The baseline: LLM-Neo (LoRA) on another vocabulary, with its own loss where there are several.
    others = [r for r in order if r.student != own and r.method == "neo" and r.variant in ("lora", None)]
    baseline = min(others, key=lambda r: (r.label != "neo", r.label)) if others else None

    def score(run_id: str, task: str, metric: str) -> Optional[pd.Series]:
        if per_doc is None or per_doc.empty:
            return None
        mine = per_doc[(per_doc["run_id"] == run_id) & (per_doc["task"] == task) & (per_doc["metric"] == metric)]
        return None if mine.empty else mine.set_index("doc")["value"]

    comparisons = {}
    for r in order:
        if baseline is None or r.run_id == baseline.run_id:
            continue
        for task, metric in PAIRED:
            a, b = score(r.run_id, task, metric), score(baseline.run_id, task, metric)
            if a is None or b is None:
                continue
            docs = sorted(set(a.index) & set(b.index))
            comparisons[(r.run_id, task)] = compare(a[docs].to_numpy()[None], b[docs].to_numpy()[None])
    adjusted = dict(zip(comparisons, holm([c.p for c in comparisons.values()])))

    display_rows, numeric_rows = [], []
    for r in order:
        values = students[students["run_id"] == r.run_id].set_index(["task", "metric"])
        shown = {"student": r.student, "model": r.label}
        numeric = {"student": r.student, "model": r.label, "run_id": r.run_id, "seed": int(r.seed)}
        for task, metric, column in CROSS_METRICS:
            if (task, metric) in values.index:
                value, stderr = values.loc[(task, metric), "value"], values.loc[(task, metric), "stderr"]
                shown[column] = f"{value:.3f}" + (f" ± {stderr:.3f}" if pd.notna(stderr) else "")
                numeric[f"{task}/{metric}"] = value
            else:
                shown[column] = "—"
        for task, metric in PAIRED:
            name = f"Δ {dict((t, c) for t, _, c in CROSS_METRICS)[task]} vs neo ({baseline.student if baseline else '?'})"
            c = comparisons.get((r.run_id, task))
            if c is None:
                shown[name] = "—"
                continue
            shown[name] = f"{c.delta:+.3f} [{c.low:+.3f}, {c.high:+.3f}]{significance_mark(adjusted[(r.run_id, task)])}"
            numeric.update({f"delta/{task}": c.delta, f"low/{task}": c.low, f"high/{task}": c.high, f"p_holm/{task}": adjusted[(r.run_id, task)]})
        shown.update({
            "trainable": f"{r.trainable_params / 1e6:.2f}M", "s/step": f"{r.train_seconds / r.steps:.2f}",
            "peak memory": f"{r.peak_memory_bytes / 2**30:.2f} GiB",
        })
        numeric.update({"trainable_params": r.trainable_params, "seconds_per_step": r.train_seconds / r.steps,
                        "peak_memory_bytes": r.peak_memory_bytes})
        display_rows.append(shown)
        numeric_rows.append(numeric)
    notes = [
        f"Every run: {ref['steps']} optimizer steps of {int(ref['batch_size']) * int(ref['grad_accum'])} examples, seq_len "
        f"{ref['seq_len']} tokens of its own tokenizer, {ref['dtype']}, seed {seed}: the same rows in the same order "
        f"(examples hash {str(ref['examples_hash'])[:12]}). Each student is scored with its own tokenizer.",
        "BPB: bits per UTF-8 byte of the held-out teacher responses (lower is better); pydoc BPB: of Python documentation; "
        "ROUGE-L of greedy answers and the 4-way response match as in the main table. ± is lm-eval's standard error.",
        "Δ: paired difference with LLM-Neo (forward KL) on the other vocabulary, on the same documents: mean and 95% "
        "paired-bootstrap interval; * marks p < 0.05 after Holm's correction over this table.",
        "s/step and peak memory: the training loop of each run (peak RSS on CPU).",
        *notes_out,
    ]
    return Table("vocabularies", "Across vocabularies", pd.DataFrame(numeric_rows), pd.DataFrame(display_rows), notes)
