"""A study's report: <study>.trials.json (neobench.ablation.export) -> <study>.md and Optuna's plots.

    study_from_export an in-memory Optuna study built from that JSON, for importances and plots
    render            <study>.md (trials best first, best parameters, fANOVA importances) and PNGs
    render_all        every exported study under leaderboards/

The files are made from the JSON alone, so `neobench report` on a fresh clone (no storage, no
runs) rebuilds them byte for byte.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

from neobench.ablation.spec import fmt_value
from neobench.ablation.storage import quiet_optuna
from neobench.reporting.tables import fmt_p


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
    name = exported["study"]
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
        lines += ["## Best", "", f"Trial {best['number']}: " + ", ".join(f"**{k} = {fmt_value(v)}**" for k, v in best["params"].items())
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
            str(rank) if t["state"] == "COMPLETE" else "–", str(t["number"]), *(fmt_value(t["params"].get(p, "")) for p in params), value,
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

    from neobench.reporting.paired import compare, holm, significance_mark

    best = complete[0].get("per_doc") if complete else None
    if not best:
        return {}
    comparisons = {t["number"]: compare(np.array(t["per_doc"]["values"]), np.array(best["values"]))
                   for t in complete[1:] if t.get("per_doc") and t["per_doc"]["docs"] == best["docs"]}
    adjusted = holm([c.p for c in comparisons.values()])
    return {number: (f"{c.delta:+.4f} [{c.low:+.4f}, {c.high:+.4f}]{significance_mark(p)}", fmt_p(p))
            for (number, c), p in zip(comparisons.items(), adjusted)}


def render_all(leaderboards: Path, preset: Optional[str] = None) -> list[Path]:
    files = []
    for path in sorted(leaderboards.glob("*/ablations/*.trials.json")):
        if preset and path.parent.parent.name != preset:
            continue
        files += render(json.loads(path.read_text()), path.parent)
    return files
