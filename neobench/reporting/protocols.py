"""Training protocols: paper (every method at its preset rate) and tuned (each at the rate the
tune-lr study chose on the validation split), never mixed in one table; plus the tuning table and
the protocol's text for the README.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from neobench.ablation.tuned import TUNING_STUDIES, best_lr_scales
from neobench.reporting.selection import Selection, student_order
from neobench.reporting.tables import Table
from neobench.training.labels import label_of


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
    return best_lr_scales(list(zip(trials["label"], trials["lr_scale"], trials["value"])), minimize=True)


def tuning_trials(rows: pd.DataFrame) -> pd.DataFrame:
    """The tuning studies' trial rows of their objective (validation NLL), one per trial."""
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
