"""One trial as ordinary runs: its direction, its runs' outcomes and scores, and the reporter in its run.

Every trial is an ordinary run directory whose config carries ``study`` and ``trial``, so
`neobench report` collects it (the main tables leave trials out and point to the study's page).
In the trial's `neobench run` process, trial_reporter reports held-out NLL every few steps and the
pruner may stop the run there (exit PRUNED_EXIT).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from neobench.ablation.spec import StudySpec, load_spec
from neobench.ablation.storage import load_study
from neobench.core.errors import NeobenchError
from neobench.core.progress import console
from neobench.runs.config import RunConfig

PRUNED_EXIT = 3


class TrialFailed(NeobenchError):
    pass


class TrialDiverged(NeobenchError):
    """The trial's run diverged (exit DIVERGED_EXIT): FAIL with the reason, never retried."""


def objective_direction(spec: StudySpec, cfg: RunConfig, student_path: str) -> str:
    """minimize or maximize, from the task's higher_is_better as lm-eval (or neo_fidelity) declares it."""
    from neobench.evaluation.catalog import FIDELITY, FIDELITY_HIGHER_IS_BETTER, EvalSpec, load_tasks

    task, metric = spec.objective_task, spec.objective_metric
    if task == FIDELITY:
        better = FIDELITY_HIGHER_IS_BETTER
    else:
        taskset = load_tasks(dataclasses.replace(EvalSpec.from_config(cfg), tasks=(task,)), student_path)
        loaded = taskset.manager.load([task])["tasks"]
        if task not in loaded:
            raise NeobenchError(f"study {spec.source!r}: field 'objective' names {task!r}, a group; name one of its tasks: {', '.join(loaded)}")
        better = loaded[task].higher_is_better()
    if metric not in better:
        raise NeobenchError(f"study {spec.source!r}: field 'objective' names metric {metric!r}, which {task} does not report; it reports {', '.join(better)}")
    return "maximize" if better[metric] else "minimize"


def resumable_run(trial, runs_dir: str, offset: int) -> Optional[str]:
    """The unfinished run (with a checkpoint) of the failed trial this one retries, if any.

    A retried trial (Optuna's RetryFailedTrialCallback) inherits the user attributes of the trial
    it repeats, among them the id of the run that trial was training; when that run was killed
    after writing a checkpoint (the study's runs use save_every), the retry continues it.
    """
    from neobench.training.checkpoint import latest

    run_id = trial.user_attrs.get(f"unfinished_run_{offset}")
    if run_id and latest(Path(runs_dir) / f".tmp-{run_id}") is not None:
        return run_id
    return None


def failure_reason(runs_dir: Path, run_id: str) -> str:
    from neobench.runs.store import FAILURE_FILE

    path = runs_dir / f".tmp-{run_id}" / FAILURE_FILE
    return json.loads(path.read_text())["message"] if path.is_file() else "its run diverged"


def read_objective(run_dir: Path, spec: StudySpec) -> dict:
    """The objective's value (and the reference models' values) from a finished trial's run directory."""
    found: dict[str, Any] = {"teacher": None, "untrained": None, "stderr": None}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    found.update(train_seconds=metrics["cost"]["train_seconds"], peak_memory_bytes=metrics["cost"]["peak_memory_bytes"],
                 trainable_params=metrics["cost"]["trainable_params"])
    roles = {"student": "value", "teacher": "teacher", "untrained_student": "untrained"}
    for path in sorted((run_dir / "evaluations").glob("*.json")):
        for evaluation in json.loads(path.read_text())["evaluations"]:
            for row in evaluation["rows"]:
                if (row["task"], row["metric"]) == (spec.objective_task, spec.objective_metric):
                    found[roles[evaluation["role"]]] = row["value"]
                    if evaluation["role"] == "student":
                        found["stderr"] = row.get("stderr")
    if "value" not in found:
        raise TrialFailed(f"run {run_dir.name} has no {spec.objective} score; was it evaluated on {spec.objective_task}?")
    return found


def trial_reporter(payload: dict):
    """In a trial's `neobench run` process: report held-out NLL every few steps; stop if pruned.

    The value is signed to the study's direction (NLL for a minimized objective, -NLL for a
    maximized one), so the pruner compares it as it compares the objective. Only a trial's first
    seed reports; its later seeds run to the end.
    """
    import optuna

    from neobench.evaluation.fidelity import encode_pairs, heldout_nll
    from neobench.evaluation.suite import heldout_pairs

    spec = load_spec(payload["spec"])
    if not payload.get("report") or spec.report_every == 0:
        return None
    study, _ = load_study(spec, payload["study"], payload["storage"])
    trial = optuna.trial.Trial(study, payload["trial_id"])
    sign = 1.0 if study.direction.name.lower() == "minimize" else -1.0
    examples: list = []

    def after_step(step: int, student, ws) -> None:
        if step % spec.report_every:
            return
        if not examples:
            cfg = spec.base_config()
            examples.extend(encode_pairs(ws.tokenizer, heldout_pairs(cfg.eval_data, cfg.eval_split)[: spec.report_prompts]))
        nll = heldout_nll(student, ws.tokenizer.pad_token_id, examples)
        trial.report(sign * nll, step)
        console.print(f"[dim]step {step}: held-out NLL {nll:.4f} on {len(examples)} prompts (reported)[/dim]", highlight=False)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} (held-out NLL {nll:.4f})")

    return after_step
