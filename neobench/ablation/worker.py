"""Running a study: `neobench ablate` prepares once and fans out K workers; each worker asks a
trial, trains and evaluates it in a child `neobench run`, and tells its value until N are finished.

Exactly N trials: a worker starts a trial only while fewer than N are finished or running, and a
trial asked in the same instant as another that fills the budget is told FAIL as "surplus"
before it trains. A trial whose run died is queued again with the same parameters; one that
diverged is failed with its reason and never run again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional

from neobench.ablation.spec import StudySpec, fmt_value, grid_size
from neobench.ablation.storage import (
    DIVERGED_ATTR, counted, create_study, default_storage, diverged, load_study, open_storage, reap_dead_trials, requeue,
)
from neobench.ablation.trial import (
    PRUNED_EXIT, TrialDiverged, TrialFailed, failure_reason, objective_direction, read_objective, resumable_run,
)
from neobench.core.errors import DIVERGED_EXIT, NeobenchError
from neobench.core.progress import console
from neobench.runs.config import apply_overrides, validate

MAX_FAILURES_IN_A_ROW = 3


class SurplusTrial(Exception):
    """This trial was asked while another filled the study's last slot; it is dropped before training."""


def run_study(
    spec: StudySpec, n_trials: Optional[int], storage_url: Optional[str], workers: int, study_name: Optional[str],
    runs_dir: Optional[str], command: str,
) -> tuple[Any, str]:
    """`neobench ablate`: prepare shared artefacts once, then run workers until N trials are finished."""
    import subprocess

    from neobench.training.workspace import prepare

    base = spec.base_config()
    runs_dir = runs_dir or base.runs_dir
    base = dataclasses.replace(base, runs_dir=runs_dir)
    storage_url = storage_url or default_storage(runs_dir)
    study_name = study_name or spec.name
    n_trials = n_trials or spec.trials
    open_storage(storage_url)  # a bad URL fails now, not after the models are prepared
    size = grid_size(spec)
    if size is not None and n_trials > size:
        console.print(f"the grid has {size} points; running {size} trials, not {n_trials}", highlight=False)
        n_trials = size
    # Dequantize/prune once and check the objective's task before any worker starts.
    from neobench.evaluation.catalog import FIDELITY, EvalSpec
    from neobench.training.methods import METHODS

    eval_spec = EvalSpec.from_config(base)
    ws = prepare(base, need_teacher=METHODS.get(base.method).uses_teacher or FIDELITY in eval_spec.tasks,
                 fidelity=FIDELITY in eval_spec.tasks)
    direction = objective_direction(spec, base, ws.student_path)
    study, storage = create_study(spec, study_name, storage_url, direction, command)
    before = counted(study)
    console.print(
        f"study [bold]{study_name}[/bold] ({spec.source}): {direction} {spec.objective}; {spec.sampler} sampler, "
        f"{spec.pruner} pruner; {before} of {n_trials} trials already there; storage {storage_url}", highlight=False,
    )
    if workers <= 1:
        work(spec, study_name, storage_url, n_trials, runs_dir)
    else:
        cmd = [sys.executable, "-m", "neobench.cli", "ablate", spec.source, "--trials", str(n_trials),
               "--storage", storage_url, "--study-name", study_name, "--runs-dir", runs_dir]
        dtype = dict(spec.fixed).get("dtype")
        if dtype is not None:  # from the file or --dtype: passing it again is the same study
            cmd += ["--dtype", str(dtype)]
        children = [subprocess.Popen([*cmd, "--worker", str(i + 1)]) for i in range(workers)]
        try:
            codes = [c.wait() for c in children]
        except KeyboardInterrupt:
            for c in children:
                try:
                    c.wait(timeout=90)  # each worker got the SIGINT too: let it re-queue its trial
                except subprocess.TimeoutExpired:
                    c.kill()
            raise
        if any(codes):
            raise NeobenchError(f"worker(s) exited with {codes}; `neobench ablate {spec.name}` again continues the study")
    return study, storage_url


def work(spec: StudySpec, study_name: str, storage_url: str, n_trials: int, runs_dir: str, worker_index: int = 0) -> None:
    """One worker: run trials until the study holds ``n_trials`` finished ones."""
    from neobench.runs.execute import run_in_child
    from neobench.runs.store import new_run_id
    from neobench.training.labels import run_label

    study, storage = load_study(spec, study_name, storage_url, worker_index)
    base = dataclasses.replace(spec.base_config(), runs_dir=runs_dir)
    me = f"{socket.gethostname()}:{os.getpid()}"
    current: dict[str, Any] = {}

    def objective(trial) -> float:
        import optuna

        trial.set_user_attr("worker", me)
        current["number"] = trial.number
        if _is_surplus(study, trial.number, n_trials):
            trial.set_user_attr("surplus", True)
            raise SurplusTrial()
        params = {p.name: p.suggest(trial) for p in spec.space}
        console.rule(f"[bold]{study_name} trial {trial.number}: {', '.join(f'{k}={fmt_value(v)}' for k, v in params.items())}")
        run_ids, values, stderrs = [], [], []
        for offset in range(spec.seeds):
            cfg = validate(dataclasses.replace(
                apply_overrides(base, params, f"trial {trial.number}"), seed=base.seed + offset,
                study=study_name, trial=trial.number,
            ))
            run_id = new_run_id(cfg)
            payload = {"storage": storage_url, "study": study_name, "spec": spec.source, "trial_id": trial._trial_id,
                       "report": offset == 0}
            resume = resumable_run(trial, runs_dir, offset)
            trial.set_user_attr(f"unfinished_run_{offset}", resume or run_id)
            if resume:
                console.print(f"trial {trial.number}: continuing {resume} from its checkpoint", highlight=False)
                code = run_in_child(cfg, resume, ("--resume", resume, "--runs-dir", runs_dir), resolved=False)
                run_id = resume
            else:
                code = run_in_child(cfg, run_id, ("--optuna-trial", json.dumps(payload)))
            if code == PRUNED_EXIT:
                raise optuna.TrialPruned()
            if code == DIVERGED_EXIT:
                reason = failure_reason(Path(runs_dir), run_id)
                trial.set_user_attr(DIVERGED_ATTR, reason)
                raise TrialDiverged(f"trial {trial.number} ({params}) failed: {reason}")
            if code != 0:
                raise TrialFailed(f"trial {trial.number} ({run_label(cfg)}, {params}) failed: its run exited with {code}")
            run_ids.append(run_id)
            trial.set_user_attr("run_ids", run_ids)
            found = read_objective(Path(runs_dir) / run_id, spec)
            values.append(found["value"])
            stderrs.append(found["stderr"])
            for key in ("teacher", "untrained", "train_seconds", "peak_memory_bytes", "trainable_params"):
                trial.set_user_attr(key, found[key])
        value = sum(values) / len(values)
        trial.set_user_attr("seed_values", values)
        if all(s is not None for s in stderrs):
            trial.set_user_attr("stderr", math.sqrt(sum(s * s for s in stderrs)) / len(stderrs))
        return value

    failures = 0
    while True:
        reaped = reap_dead_trials(study, storage)
        if reaped:
            console.print(f"re-queued trial(s) {', '.join(map(str, reaped))}: their worker process is gone", highlight=False)
        if counted(study) >= n_trials and not _waiting(study):
            return
        current.clear()
        try:
            study.optimize(objective, n_trials=1, catch=(), gc_after_trial=False)
        except SurplusTrial:
            return
        except TrialDiverged as err:  # FAIL, with its reason; not queued again
            console.print(f"[red]{err}; not retried[/red]", highlight=False)
            continue
        except TrialFailed as err:
            # Its run process died (killed, out of memory): queue the same parameters again (up to
            # 3 times); a setting that fails every time stops the worker after 3 failures in a row.
            failures += 1
            requeue(study, study.get_trials(deepcopy=False)[current["number"]])
            console.print(f"[red]{err}; queued again[/red]", highlight=False)
            if failures >= MAX_FAILURES_IN_A_ROW:
                raise NeobenchError(f"{failures} trials in a row failed; the last: {err}") from None
            continue
        except KeyboardInterrupt:
            if "number" in current:  # optuna marked it FAIL; queue it again so the study resumes with it
                requeue(study, study.get_trials(deepcopy=False)[current["number"]])
            raise
        failures = 0
        _print_progress(study, n_trials)


def _waiting(study) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _is_surplus(study, number: int, n_trials: int) -> bool:
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    return sum(1 for t in study.get_trials(deepcopy=False) if t.number < number and (t.state in live or diverged(t))) >= n_trials


def _print_progress(study, n_trials: int) -> None:
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    last = max(done, key=lambda t: t.datetime_complete)
    best = study.best_trial if any(t.state == TrialState.COMPLETE for t in done) else None
    what = f"{study.user_attrs.get('objective')} {last.value:.4f}" if last.state == TrialState.COMPLETE else "pruned"
    best_text = f"; best {best.value:.4f} (trial {best.number}: {best.params})" if best else ""
    console.print(f"[bold]trial {last.number}[/bold] {what}{best_text}; {len(done)}/{n_trials} done", highlight=False)
