"""A study's trials exported as plain JSON: leaderboards/<preset>/ablations/<study>.trials.json.

What the committed ablation tables and plots are made from (neobench.reporting.ablations), so they
rebuild on a fresh clone that has no Optuna storage and no runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from neobench.ablation.storage import quiet_optuna


def objective_per_doc(run_ids: list[str], per_doc, task: str, metric: str) -> Optional[dict]:
    """{"docs": [hash, ...], "values": [[per doc] per run]} of a trial's objective, from the per-document
    scores of its runs (neobench.runs.results.load_per_doc); None unless every run has them on the same documents."""
    values, docs = [], None
    for run_id in run_ids:
        mine = per_doc[(per_doc["run_id"] == run_id) & (per_doc["task"] == task) & (per_doc["metric"] == metric)]
        if mine.empty or (docs is not None and list(mine["doc"]) != docs):
            return None
        docs = list(mine["doc"])
        values.append([float(v) for v in mine["value"]])
    return {"docs": docs, "values": values} if docs else None


def export_trials(study, per_doc=None) -> dict:
    """The study and its trials as plain JSON (what the committed tables and plots are made from).

    ``per_doc`` (the trials' runs' per-document scores) adds each finished trial's per-document
    objective, so the table can compare every trial with the best on the same documents."""
    from optuna.distributions import distribution_to_json

    task, _, metric = str(study.user_attrs.get("objective", "")).partition("/")
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        scores = None
        if per_doc is not None and t.state.name == "COMPLETE":
            scores = objective_per_doc(t.user_attrs.get("run_ids", []), per_doc, task, metric)
        trials.append({
            "number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
            "distributions": {k: json.loads(distribution_to_json(d)) for k, d in t.distributions.items()},
            "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            "user_attrs": {k: v for k, v in sorted(t.user_attrs.items()) if k != "worker"},
            "retry_of": t.system_attrs.get("failed_trial"),
            "duration_seconds": t.duration.total_seconds() if t.duration else None,
            **({"per_doc": scores} if scores else {}),
        })
    return {"study": study.study_name, "direction": study.direction.name.lower(),
            "attrs": dict(sorted(study.user_attrs.items())), "trials": trials}


def write_export(exported: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(exported, indent=1, sort_keys=True, default=str) + "\n")


def export_studies(storage_url: str, leaderboards: Path, only: Optional[str] = None, per_doc=None) -> list[Path]:
    """Every study on a storage -> leaderboards/<preset>/ablations/<study>.trials.json, with the
    per-document objective of each trial whose runs are in ``per_doc`` (neobench.runs.results.load_per_doc)."""
    import optuna

    quiet_optuna()
    written = []
    for summary in optuna.get_all_study_summaries(storage=storage_url):
        if only and summary.study_name != only:
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage_url)
        preset = study.user_attrs.get("preset")
        if not preset:
            continue  # not made by neobench ablate
        path = leaderboards / Path(preset).stem / "ablations" / f"{summary.study_name}.trials.json"
        write_export(export_trials(study, per_doc), path)
        written.append(path)
    return written
