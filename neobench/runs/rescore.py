"""Scoring again: a stored run's student rebuilt from its weights (`neobench eval --run`), or any
model (`neobench eval --model`, cached by content)."""

from __future__ import annotations

from neobench.core.errors import NeobenchError
from neobench.core.progress import console
from neobench.runs.config import RunConfig, validate
from neobench.runs.execute import evaluate_student
from neobench.runs.store import find_run


def evaluate_run(run: str, runs_dir: str, eval_overrides: dict) -> dict:
    """`neobench eval --run`: rebuild the run's student from its stored weights and score it."""
    from neobench.evaluation.catalog import FIDELITY, EvalSpec, load_tasks, parse_task_list
    from neobench.runs.config import apply_overrides, load_preset
    from neobench.training.loop import WEIGHTS_FILE, load_trained_student
    from neobench.training.workspace import prepare

    run_dir = find_run(run, runs_dir)
    stored = load_preset(str(run_dir / "config.yaml"))
    if "eval_tasks" not in eval_overrides and not parse_task_list(stored.eval_tasks):
        # A run trained with --tasks none was "not now", not "never": score it on its preset's suite.
        eval_overrides = {**eval_overrides, "eval_tasks": preset_tasks(stored.preset)}
    cfg = validate(apply_overrides(stored, eval_overrides, "command-line flags"))
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise NeobenchError(f"run {run_dir.name} stored no weights (it ran with save_weights off); train it again to evaluate it")
    spec = EvalSpec.from_config(cfg)
    if not spec.tasks:
        raise NeobenchError("--tasks none leaves nothing to evaluate; name tasks or neo_suite")
    ws = prepare(cfg, need_teacher=FIDELITY in spec.tasks, fidelity=FIDELITY in spec.tasks)
    taskset = load_tasks(spec, ws.student_path)
    return evaluate_student(cfg, ws, load_trained_student(cfg, ws, weights), run_dir, taskset)


def preset_tasks(preset: str) -> str:
    """The evaluation tasks of a packaged preset (the default suite for a preset file that is gone)."""
    from neobench.runs.config import PRESETS, load_preset

    from neobench.evaluation.catalog import parse_task_list

    tasks = load_preset(preset).eval_tasks if preset in PRESETS else RunConfig.eval_tasks
    return tasks if parse_task_list(tasks) else RunConfig.eval_tasks


def evaluate_model(model: str, preset: str, eval_overrides: dict) -> dict:
    """`neobench eval --model`: score any model (cached by content) on the preset's evaluation."""
    from neobench.evaluation.catalog import FIDELITY, EvalSpec, load_tasks
    from neobench.evaluation.harness import model_evaluation, scores_table
    from neobench.runs.config import apply_overrides, load_preset
    from neobench.training.workspace import prepare

    cfg = validate(apply_overrides(load_preset(preset), {**eval_overrides, "student": model}, "command-line flags"))
    spec = EvalSpec.from_config(cfg)
    if not spec.tasks:
        raise NeobenchError("--tasks none leaves nothing to evaluate; name tasks or neo_suite")
    ws = prepare(cfg, need_teacher=FIDELITY in spec.tasks, fidelity=FIDELITY in spec.tasks)
    taskset = load_tasks(spec, ws.student_path)
    result = model_evaluation(
        "model", ws.student_path, taskset, ws.device, ws.dtype, teacher_path=ws.teacher_path, vocab_size=ws.vocab_size
    )
    how = "cached scores" if result["cached"] else f"scored in {result['seconds']:.0f} s"
    console.print(scores_table([(model, result["rows"])], title=f"scores (± stderr), {how}"))
    return result
