"""Scoring a model: lm-evaluation-harness on the model as it is in memory, plus neo_fidelity.

    TaskSet (from neobench.evaluation.catalog)
      -> evaluate     lm-eval's simple_evaluate on an HFLM wrapping the model as it is in memory,
                      and neo_fidelity computed directly (it needs teacher and student at once)
      -> rows         one per task x metric: value, stderr as lm-eval reports it, task hash, ...

Reference rows (the teacher and the untrained student) are cached in the neobench cache, keyed
by model fingerprint, task hashes and the spec, so a matrix pays for them once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from neobench.core.errors import NeobenchError
from neobench.evaluation.catalog import (
    DOC_KEY_CHARS,
    FIDELITY,
    SHORT_NAMES,
    EvalSpec,
    TaskSet,
    content_sha,
    lm_eval_version,
)
from neobench.evaluation.fidelity import fidelity_rows


# --- evaluating one model ------------------------------------------------------------------


def evaluate(
    model: torch.nn.Module, tokenizer, taskset: TaskSet, *, teacher: Optional[torch.nn.Module] = None,
    vocab_size: Optional[int] = None, role: str = "student",
) -> dict[str, Any]:
    """Score ``model`` (as it is in memory) on every task of ``taskset``.

    ``teacher`` is needed for neo_fidelity unless ``role`` is "teacher" (which skips it).
    Returns {"role", "rows", "seconds", "spec", "lm_eval_version", "task_hashes"}.
    """
    spec = taskset.spec
    started = time.perf_counter()
    model.eval()
    rows: list[dict[str, Any]] = []
    per_doc: dict[str, dict] = {}
    if spec.lm_eval_tasks:
        lm_rows, lm_docs = _lm_eval_rows(model, tokenizer, taskset, role)
        rows += lm_rows
        per_doc.update(lm_docs)
    if FIDELITY in spec.tasks and role != "teacher":
        if teacher is None:
            raise NeobenchError(f"{FIDELITY} needs the teacher; drop it from --tasks to evaluate without one")
        fid_rows, per_doc[FIDELITY] = fidelity_rows(model, teacher, tokenizer, spec, vocab_size, taskset.hashes[FIDELITY])
        rows += fid_rows
    return {
        "role": role, "rows": rows, "seconds": time.perf_counter() - started, "spec": spec.to_dict(),
        "lm_eval_version": lm_eval_version(), "task_hashes": taskset.hashes, "per_doc": per_doc,
    }


def _lm_eval_rows(model, tokenizer, taskset: TaskSet, role: str) -> list[dict[str, Any]]:
    import contextlib
    import io

    from lm_eval import simple_evaluate

    from neobench.core.progress import console

    spec = taskset.spec
    lm = per_task_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
    lm.generation_batch_size = spec.generation_batch_size
    console.print(f"[dim]{role}: lm-eval on {', '.join(spec.lm_eval_tasks)}[/dim]", highlight=False)
    # In a terminal lm-eval's own progress bars stay (they show the ETA); elsewhere they are off
    # and PerTaskLM's one line per task is the progress. Its "bootstrapping for stddev" lines go
    # to stdout, which neobench keeps for results. Its environment report is skipped: neobench
    # records versions itself, and the report costs seconds per call and runs `git describe`,
    # whose "fatal: not a git repository" would reach the terminal outside a checkout.
    # DISABLE_MULTIPROC: lm-eval bootstraps each stderr in this process, not in a pool it forks
    # from a process full of torch threads (the same seeded chunks, so the same values). A pool
    # worker still starting when the pool is torn down could miss its SIGTERM and hang the run.
    from unittest import mock

    with contextlib.redirect_stdout(io.StringIO()), tqdm_off_unless(console.is_terminal), \
            mock.patch.dict(os.environ, {"DISABLE_MULTIPROC": "1"}), \
            mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None), \
            mock.patch("lm_eval.evaluator.add_env_info", lambda results: None):
        results = simple_evaluate(
            model=lm, tasks=spec.lm_eval_tasks, task_manager=taskset.manager, limit=spec.limit,
            num_fewshot=spec.num_fewshot, apply_chat_template=spec.chat_template and bool(tokenizer.chat_template),
            bootstrap_iters=spec.bootstrap_iters, log_samples=True,
        )
    return rows_from_results(results, taskset.hashes, spec), per_doc_from_samples(results)


def per_doc_from_samples(results: dict) -> dict[str, dict]:
    """lm-eval's logged samples -> {task: {"docs": [doc key], "metrics": {metric: [value per doc]}}},
    documents in lm-eval's doc_id order; generation tasks also keep each answer ("answers")."""
    per_doc = {}
    for task, samples in (results.get("samples") or {}).items():
        samples = sorted(samples, key=lambda s: s["doc_id"])
        names = list(dict.fromkeys(m for s in samples for m in s["metrics"]))
        entry: dict[str, Any] = {
            "docs": [s["doc_hash"][:DOC_KEY_CHARS] for s in samples],
            "metrics": {m: [_scalar(s.get(m)) for s in samples] for m in names},
        }
        if samples and all(isinstance(r, str) for s in samples for r in _flat(s["filtered_resps"])):
            entry["answers"] = [_flat(s["filtered_resps"]) for s in samples]
        per_doc[task] = entry
    return per_doc


def _flat(responses: list) -> list:
    """filtered_resps: one entry per request, each a string (generate_until) or a tuple/list."""
    out = []
    for r in responses:
        out.extend(r if isinstance(r, list) else [r])
    return out


def _scalar(value: Any) -> Optional[float]:
    """A per-document metric value as a float (lm-eval's perplexity items are plain floats too)."""
    if isinstance(value, (list, tuple)):  # e.g. a (prediction, reference) pair of corpus metrics: not per-document
        return None
    return None if value is None else float(value)


@functools.cache
def per_task_lm_class():
    """lm-eval's HFLM, running each task's requests on their own and reporting each in one line.

    lm-eval hands a model all tasks' requests of one kind at once. Split by task, they give a
    time per task; the split is the same in a terminal and in a log, so scores never depend on
    where the output goes. It moved the untrained student's smol-cpu scores by at most 1.4e-8
    (other batch shapes), far below any printed digit.
    """
    from lm_eval.models.huggingface import HFLM

    from neobench.core.progress import console

    class PerTaskLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._per_task("loglikelihood", requests, disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._per_task("loglikelihood_rolling", requests, disable_tqdm)

        generation_batch_size: Optional[int] = None

        def generate_until(self, requests, disable_tqdm: bool = False):
            if not self.generation_batch_size:
                return self._per_task("generate_until", requests, disable_tqdm)
            # HFLM batches by its batch_size property, which reads batch_size_per_gpu: larger for generation only.
            kept, self.batch_size_per_gpu = self.batch_size_per_gpu, self.generation_batch_size
            try:
                return self._per_task("generate_until", requests, disable_tqdm)
            finally:
                self.batch_size_per_gpu = kept

        def _per_task(self, kind: str, requests, disable_tqdm: bool):
            by_task: dict[str, list[int]] = {}
            for i, request in enumerate(requests):
                by_task.setdefault(request.task_name, []).append(i)
            answers: list[Any] = [None] * len(requests)
            for task, positions in by_task.items():
                started = time.perf_counter()
                run = getattr(super(), kind)
                for i, answer in zip(positions, run([requests[i] for i in positions], disable_tqdm=disable_tqdm)):
                    answers[i] = answer
                console.print(
                    f"  {task}: {len(positions)} {kind} requests in {time.perf_counter() - started:.1f} s", highlight=False
                )
            return answers

    return PerTaskLM


@contextlib.contextmanager
def tqdm_off_unless(interactive: bool):
    """Outside a terminal, every tqdm bar is disabled: in a log its carriage returns are noise.

    lm-eval creates bars with an explicit ``disable=False`` in places no argument reaches
    (building a task's contexts, bootstrapping), so the switch is tqdm's own constructor.
    """
    if interactive:
        yield
        return
    from unittest import mock

    import tqdm.std

    original = tqdm.std.tqdm.__init__

    def quiet(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    with mock.patch.object(tqdm.std.tqdm, "__init__", quiet):
        yield


def rows_from_results(results: dict, hashes: dict[str, str], spec: EvalSpec) -> list[dict[str, Any]]:
    """lm-eval's results dict -> one row per task x metric ("acc,none" -> acc; other filters kept)."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            n = results.get("n-samples", {}).get(task, {})
            rows.append({
                "task": task, "metric": metric if filt == "none" else f"{metric},{filt}",
                "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "higher_is_better": results.get("higher_is_better", {}).get(task, {}).get(metric),
                "n_docs": n.get("effective"), "num_fewshot": results.get("n-shot", {}).get(task),
                "limit": spec.limit, "task_version": results.get("versions", {}).get(task),
                "task_hash": hashes.get(task), "evaluator": f"lm-eval {lm_eval_version()}",
            })
    return rows


# --- reference rows and stored results -----------------------------------------------------


def model_evaluation(
    role: str, model_path: str, taskset: TaskSet, device: str, dtype: torch.dtype, *,
    model: Optional[torch.nn.Module] = None, teacher_path: Optional[str] = None,
    teacher: Optional[torch.nn.Module] = None, vocab_size: Optional[int] = None,
) -> dict[str, Any]:
    """Evaluate a stored model (teacher, untrained student, any --model), cached by content.

    ``model`` may pass the one already loaded from ``model_path`` (the teacher of a KD run).

    The cache key covers the model's fingerprint, the task hashes, the spec and lm-eval's version
    (and the teacher's fingerprint when neo_fidelity is scored against it).
    """
    from neobench.models.loading import cache_dir, load_causal_lm, load_tokenizer
    from neobench.models.loading import model_fingerprint

    needs_teacher = FIDELITY in taskset.spec.tasks and role != "teacher"
    fingerprint = model_fingerprint(model_path)
    key = content_sha({
        "model": fingerprint, "tasks": taskset.hashes, "spec": taskset.spec.to_dict(),
        "lm_eval": lm_eval_version(), "teacher": model_fingerprint(teacher_path) if needs_teacher else None,
        "dtype": str(dtype),
    })
    path = cache_dir() / "evaluations" / f"{key[:24]}.json"
    if path.is_file():  # the same model under another role (--model pruned:15) reuses the scores
        return {**json.loads(path.read_text()), "role": role, "cached": True}
    model = model if model is not None else load_causal_lm(model_path, dtype, device)
    if needs_teacher and teacher is None:
        teacher = load_causal_lm(teacher_path, dtype, device).eval()
    result = evaluate(model, load_tokenizer(model_path), taskset, teacher=teacher, vocab_size=vocab_size, role=role)
    result["model"], result["model_fingerprint"] = model_path, fingerprint
    write_json_atomic(path, result)
    return {**result, "cached": False}


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


TERMINAL_HIDDEN = {("neo_heldout_nll", "perplexity"), ("neo_heldout_match", "acc_norm"), ("neo_heldout_rougeL", "at_cap")}
"""Left out of the terminal table so that it fits 80 columns (exp of NLL, a variant of match, and a
share the length column hints at); the run's evaluations/ and the leaderboards have them."""


def scores_table(evaluations: list[tuple[str, list[dict]]], title: str = "scores (± stderr)"):
    """Rows = models, columns = task metrics; two lines per cell (value, ± stderr) to fit 80 columns."""
    from rich import box
    from rich.table import Table

    columns: list[tuple[str, str]] = []
    for _, rows in evaluations:
        for r in rows:
            if (r["task"], r["metric"]) not in columns and (r["task"], r["metric"]) not in TERMINAL_HIDDEN:
                columns.append((r["task"], r["metric"]))
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model", no_wrap=True)
    for task, metric in columns:
        arrow = ""
        hib = next((r["higher_is_better"] for _, rows in evaluations for r in rows if (r["task"], r["metric"]) == (task, metric)), None)
        if hib is not None:
            arrow = " ↑" if hib else " ↓"
        table.add_column(SHORT_NAMES.get((task, metric), f"{task}/{metric}") + arrow, justify="right")
    for label, rows in evaluations:
        cells = {(r["task"], r["metric"]): r for r in rows}
        row = []
        for col in columns:
            r = cells.get(col)
            if r is None:
                row.append("-")
            else:
                digits = 2 if abs(r["value"]) >= 10 else 3  # ROUGE-L (x100) and lengths in tokens
                err = f"\n±{r['stderr']:.{digits}f}" if r["stderr"] is not None else ""
                row.append(f"{r['value']:.{digits}f}{err}")
        table.add_row(label, *row)
    return table
