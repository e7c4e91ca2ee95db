"""Ablation outputs: a study's trials -> <study>.trials.json -> <study>.md and Optuna's plots.

    export_trials     the study and its trials as plain JSON (committed under leaderboards/<preset>/ablations/)
    study_from_export an in-memory Optuna study built from that JSON, for importances and plots
    render            <study>.md (trials best first, best parameters, fANOVA importances) and PNGs

The files are made from the JSON alone, so `neobench report` on a fresh clone (no storage, no
runs) rebuilds them byte for byte.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

from neobench.ablation.spec import fmt
from neobench.ablation.storage import quiet_optuna
from neobench.reporting.tables import fmt_p



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


def study_from_export(exported: dict):
    """An in-memory Optuna study holding the exported trials (for importances and Optuna's plots)."""
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import TrialState, create_trial

    quiet_optuna()
    study = optuna.create_study(direction=exported["direction"], study_name=exported["study"])
    for t in exported["trials"]:
        state = TrialState[t["state"]]
        if state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        study.add_trial(create_trial(
            state=state, value=t["value"] if state == TrialState.COMPLETE else None, params=t["params"],
            distributions={k: json_to_distribution(json.dumps(d)) for k, d in t["distributions"].items()},
            intermediate_values={int(k): v for k, v in t["intermediate"].items()},
        ))
    return study


def render(exported: dict, out_dir: Path) -> list[Path]:
    """<study>.md (trials sorted by objective, best parameters, importances) and its PNG plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.trial import TrialState

    out_dir.mkdir(parents=True, exist_ok=True)
    name, attrs = exported["study"], exported["attrs"]
    study = study_from_export(exported)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    files: list[Path] = []
    importances: dict[str, float] = {}
    if len(complete) >= 2:
        importances = optuna.importance.get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    plots = {"history": lambda: optuna.visualization.matplotlib.plot_optimization_history(study)}
    if complete:
        plots["slice"] = lambda: optuna.visualization.matplotlib.plot_slice(study)
    # A contour interpolates between neighbouring values, which means nothing across unordered
    # categories (method, variant): only numeric parameters get one; the slice plot shows the rest.
    numeric = sorted({k for t in complete for k, d in t.distributions.items()
                      if not isinstance(d, optuna.distributions.CategoricalDistribution)})
    if len(numeric) >= 2:
        plots["contour"] = lambda: optuna.visualization.matplotlib.plot_contour(study, params=numeric)
    if importances:
        plots["importances"] = lambda: optuna.visualization.matplotlib.plot_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=0))
    if any(t.intermediate_values for t in study.trials):
        plots["intermediate"] = lambda: optuna.visualization.matplotlib.plot_intermediate_values(study)
    images = []
    for kind, draw in plots.items():
        # Optuna's plots switch matplotlib's global style to ggplot; keep that change inside, or
        # every later plot of the process (the leaderboard's) would be drawn differently.
        path = out_dir / f"{name}_{kind}.png"
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
            axes = draw()
            fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            fig.set_size_inches(max(6.4, fig.get_size_inches()[0]), 4.2)
            fig.tight_layout()
            fig.savefig(path, dpi=100, metadata={"Software": None})
            plt.close(fig)
        files.append(path)
        images.append((kind, path.name))
    md = out_dir / f"{name}.md"
    md.write_text(_markdown(exported, importances, images))
    files.insert(0, md)
    return files


def _markdown(exported: dict, importances: dict[str, float], images: list[tuple[str, str]]) -> str:
    attrs, direction = exported["attrs"], exported["direction"]
    objective = attrs.get("objective", "objective")
    better = "lower" if direction == "minimize" else "higher"
    trials = exported["trials"]
    params = list(dict.fromkeys(k for t in trials for k in t["params"]))
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    complete.sort(key=lambda t: t["value"], reverse=direction == "maximize")
    others = [t for t in trials if t["state"] != "COMPLETE"]
    lines = [
        f"# Ablation `{exported['study']}` on {Path(attrs.get('preset', '?')).stem}",
        "",
        *([attrs["description"], ""] if attrs.get("description") else []),
        f"Made by `{attrs.get('command', '?')}`; regenerated by `neobench report`. Generated file: do not edit.",
        "",
        f"- objective: `{objective}`, {better} is better (lm-eval's higher_is_better); the mean over "
        f"{attrs.get('seeds', 1)} seed(s) per trial"
        + (f", scored on the {split} split of the held-out data" if (split := attrs.get("fingerprint", {}).get("eval_split")) else ""),
        f"- search space: {'; '.join(attrs.get('space', []))}",
        f"- sampler: {attrs.get('sampler')}; pruner: {attrs.get('pruner')}",
        f"- per-trial budget: {', '.join(f'{k} {v}' for k, v in attrs.get('budget', {}).items()) or 'the preset'}; "
        f"fixed: {', '.join(f'{k} {v}' for k, v in attrs.get('fixed', {}).items()) or 'nothing else'}",
        f"- trials: {len(complete)} complete, {sum(t['state'] == 'PRUNED' for t in trials)} pruned, "
        f"{sum(t['state'] == 'FAIL' for t in trials)} failed (re-queued)",
        "",
    ]
    refs = next((t["user_attrs"] for t in complete if t["user_attrs"].get("teacher") is not None), None)
    if refs:
        lines += [f"References on `{objective}`: teacher {refs['teacher']:.4f}, untrained student {refs['untrained']:.4f}.", ""]
    if complete:
        best = complete[0]
        lines += ["## Best", "", f"Trial {best['number']}: " + ", ".join(f"**{k} = {fmt(v)}**" for k, v in best["params"].items())
                  + f" -> {objective} {best['value']:.4f}" + (f" ± {best['user_attrs']['stderr']:.4f}" if best["user_attrs"].get("stderr") is not None else ""), ""]
    paired = paired_with_best(complete)
    paired_header = ["Δ vs best [95% CI]", "p (Holm)"] if paired else []
    header = ["#", "trial", *params, f"{objective} {'↓' if direction == 'minimize' else '↑'}", "± stderr", *paired_header,
              "train s", "peak GiB", "trainable", "run"]
    lines += ["## Trials, best first", "", "| " + " | ".join(header) + " |", "|" + "|".join(["--:"] * len(header)) + "|"]
    for rank, t in enumerate(complete + [t for t in others if t["state"] == "PRUNED"], 1):
        ua = t["user_attrs"]
        if t["state"] == "PRUNED":
            last_step = max(t["intermediate"], key=int) if t["intermediate"] else "?"
            value = f"pruned at step {last_step}"
        else:
            value = f"{t['value']:.4f}"
        cells = [
            str(rank) if t["state"] == "COMPLETE" else "–", str(t["number"]), *(fmt(t["params"].get(p, "")) for p in params), value,
            f"{ua['stderr']:.4f}" if ua.get("stderr") is not None else "–",
            *((paired.get(t["number"], ("—" if t is complete[0] else "–", "")) if paired else ())),
            f"{ua['train_seconds']:.1f}" if ua.get("train_seconds") else "–",
            f"{ua['peak_memory_bytes'] / 2**30:.2f}" if ua.get("peak_memory_bytes") else "–",
            f"{ua['trainable_params'] / 1e6:.3g}M" if ua.get("trainable_params") else "–",
            ", ".join(ua.get("run_ids", [])) or "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if paired:
        lines += [f"Δ vs best: each trial's {objective} minus the best trial's, on the same documents (the mean "
                  "paired difference, [95% paired-bootstrap interval] resampling documents, and seeds where there "
                  "are several); p (Holm): its two-sided bootstrap p-value after Holm's correction over the "
                  f"{len(paired)} comparisons; * where < 0.05. Without *, this study cannot tell that trial from the best.", ""]
    failed = [t for t in others if t["state"] == "FAIL"]
    if failed:
        lines += [f"Failed and re-queued: trial(s) {', '.join(str(t['number']) for t in failed)}.", ""]
    if importances:
        lines += ["## Parameter importances (fANOVA)", "", "| parameter | importance |", "|:--|--:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in importances.items()]
        lines.append("")
    if images:
        lines += ["## Plots", ""] + [f"![{kind}]({file})" for kind, file in images] + [""]
    return "\n".join(lines)


def paired_with_best(complete: list[dict]) -> dict[int, tuple[str, str]]:
    """trial number -> ("Δ [low, high]*", Holm p) against the best trial (complete[0]), for every
    finished trial whose per-document objective was exported on the best trial's documents."""
    import numpy as np

    from neobench.evaluation.paired import compare, holm, significance_mark

    best = complete[0].get("per_doc") if complete else None
    if not best:
        return {}
    comparisons = {t["number"]: compare(np.array(t["per_doc"]["values"]), np.array(best["values"]))
                   for t in complete[1:] if t.get("per_doc") and t["per_doc"]["docs"] == best["docs"]}
    adjusted = holm([c.p for c in comparisons.values()])
    return {number: (f"{c.delta:+.4f} [{c.low:+.4f}, {c.high:+.4f}]{significance_mark(p)}", fmt_p(p))
            for (number, c), p in zip(comparisons.items(), adjusted)}


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


def render_all(leaderboards: Path, preset: Optional[str] = None) -> list[Path]:
    files = []
    for path in sorted(leaderboards.glob("*/ablations/*.trials.json")):
        if preset and path.parent.parent.name != preset:
            continue
        files += render(json.loads(path.read_text()), path.parent)
    return files
