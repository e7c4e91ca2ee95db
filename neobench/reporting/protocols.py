"""Training protocols: paper (every method at its preset rate) and tuned (each at the rate the
tune-lr study chose on the validation split), never mixed in one table; plus the tuning table and
the protocol's text for the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pandas as pd

from neobench.ablation.tuned import TunedBudget, budget_of, nearest_tuned, tuned_choices, tuning_trials
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
    """label -> lr_scale: 1 for every label under "paper", the study's choice under "tuned" (at the smallest tuned budget)."""
    by_budget: dict[TunedBudget, dict[str, float]] = None
    """Under "tuned": the choice at each budget a study tuned (a run takes the one nearest its own budget)."""

    def scale_at(self, label: str, steps: int, epoch: bool) -> Optional[float]:
        """The lr_scale of ``label`` for runs of ``steps`` optimizer steps (``epoch``: one epoch of the data):
        its choice at the nearest budget that tuned it; None if none did."""
        if not self.by_budget:
            return self.lr_scales.get(label)
        tuned = [b for b, choice in self.by_budget.items() if label in choice]
        if not tuned:
            return None
        return self.by_budget[nearest_tuned(0 if epoch else steps, steps, tuned)][label]


def with_labels(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.copy()
    rows["label"] = [label_of(m, v, l) for m, v, l in zip(rows["method"], rows["variant"], rows["loss"])]
    rows["lr_scale"] = rows["lr_scale"].astype(float).fillna(1.0)
    return rows


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
    by_budget = tuned_choices(tuning_trials(rows))
    chosen = by_budget[min(by_budget, key=TunedBudget.order)] if by_budget else {}
    in_tuned = pd.Series(False, index=trained.index)
    tuned = Protocol("tuned", references, chosen, by_budget)
    if chosen:
        # Each run against the choice at the tuned budget nearest its own.
        run_choice = [tuned.scale_at(l, int(s), b == "epoch") for s, b, l in
                      zip(trained["steps"], trained["stopped_by"], trained["label"])]
        in_tuned = pd.Series([c is not None and c == x for c, x in zip(run_choice, trained["lr_scale"])], index=trained.index)
        tuned.rows = pd.concat([references, trained[in_tuned]])
        protocols.append(tuned)
    neither = trained[(trained["lr_scale"] != 1.0) & ~in_tuned].drop_duplicates("run_id")
    left_out = []
    for _, r in neither.iterrows():
        choice = tuned.scale_at(r["label"], int(r["steps"]), r["stopped_by"] == "epoch") if chosen else None
        left_out.append((r["run_id"], f"lr_scale {r['lr_scale']:g}: neither the paper protocol's 1 nor the tuned choice"
                         + (f" {choice:g}" if choice is not None else f" (no tuning study tuned {r['label']})")))
    return protocols, left_out


def tuning_table(rows: pd.DataFrame) -> Table:
    """The tuning studies: validation NLL of every method at every lr_scale it tried (per tuned budget, where
    there are several); bold: the choice. A note says how the choice moved from the smallest budget to the largest."""
    trials = tuning_trials(with_labels(rows))
    by_budget = tuned_choices(trials)
    budgets = [budget_of(s, b) for s, b in zip(trials["steps"], trials["stopped_by"])]
    several = len(set(budgets)) > 1
    scales = sorted(set(trials["lr_scale"]))
    display_rows, numeric_rows = [], []
    for budget in sorted(set(budgets), key=TunedBudget.order):
        at = trials[[b == budget for b in budgets]]
        chosen = by_budget.get(budget, {})
        for label in student_order(list(dict.fromkeys(at["label"]))):
            mine = at[at["label"] == label]
            row = {"model": label, **({"budget": budget.name} if several else {})}
            for scale in scales:
                hit = mine[mine["lr_scale"] == scale]
                text = "—" if hit.empty else f"{hit['value'].min():.3f}"
                row[f"×{scale:g}"] = f"**{text}**" if scale == chosen.get(label) else text
                for _, r in hit.iterrows():
                    numeric_rows.append({"model": label, "budget": budget.steps, "epoch": budget.max_steps == 0,
                                         "lr_scale": scale, "lr": r["lr"], "validation_nll": r["value"],
                                         "chosen": scale == chosen.get(label), "trial": r["trial"]})
            display_rows.append(row)
    notes = ["Held-out NLL ↓ on the validation split (never the test split the tables score) after the same budget, one "
             "seed, for each multiple of the method's preset learning rate; **bold** is the multiple the tuned protocol "
             "uses (the lowest NLL; a method whose search is not finished has none yet). Made by "
             + " and ".join(f"`neobench ablate {name}` (ablations/{name}.yaml)" for name in sorted(set(trials["study"]))) + "."]
    if len(by_budget) > 1:
        low, high = min(by_budget, key=TunedBudget.order), max(by_budget, key=TunedBudget.order)
        moves = [f"{l} ×{by_budget[low][l]:g} → ×{by_budget[high][l]:g}" for l in student_order(list(by_budget[low]))
                 if l in by_budget[high]]
        notes.append(f"From {low.name} to {high.name} the chosen multiple moved: {'; '.join(moves)}. A run takes the rates "
                     "tuned at the budget nearest its own (on a log scale of steps).")
    for budget, chosen in by_budget.items():
        at = trials[[b == budget for b in budgets]]
        at_edge = grid_edge_choices(at, chosen)
        if at_edge:
            where = f" at {budget.name}" if several else ""
            notes.append(f"At the edge of the grid{where}: " + "; ".join(
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
            label + (f" (×{protocol.scale_at(label, int(budget['steps']), budget['stopped_by'] == 'epoch'):g})"
                     if protocol.name == "tuned" else ""))
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
             "adapter variants; tune-lr-epoch at one epoch, where it ran: each run takes the tuning nearest its budget) "
             "tried a grid of multiples of the preset rate per method on the validation split (one seed; the search "
             "table below lists them), "
             "and each method here trains at its best multiple over the "
             "seeds shown, scored on the test split like the paper protocol. A method whose best multiple is 1 shows "
             "the paper protocol's runs again.",
}
