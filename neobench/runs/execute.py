"""Planning and executing runs: one run trained then scored, and a matrix of runs, each in its own process.

    plan          the runs a `neobench run` invocation means (validated)
    execute       one run: train, write the run directory atomically, score the student
    execute_many  a matrix: the parent validates the inputs and builds the shared artefacts
                  (dequantized teacher, pruned student) once, then every run gets a fresh
                  `neobench run` process (run_in_child), so its peak memory is its own

A process per run, because one that has trained KD keeps the freed pages of its optimizer state in its heap, which
would inflate the next run's figure. A child costs about 10 s (imports, tokenizing the data),
small next to minutes of training.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import yaml
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from neobench.core.errors import DIVERGED_EXIT, NeobenchError
from neobench.core.progress import console
from neobench.core.stopping import STOP, STOPPED_EXIT, Interrupted, Stopped, signal_point, stopped_after_training, stopped_in_training
from neobench.runs.config import RunConfig, validate
from neobench.runs.store import RunWriter, new_run_id, read_run, versions
from neobench.training.labels import run_label
from neobench.training.methods import DEFAULT_MATRIX, METHODS


def plan(base: RunConfig, method: Optional[str], variant: Optional[str], seeds: int = 1) -> list[RunConfig]:
    """The runs a `neobench run` invocation means.

    --method M [--variant V]  -> that run;  --variant V alone -> neo with V (LLM-Neo);
    neither -> the default matrix (sft, lora, kd, neo) under one budget.
    """
    if method is None and variant is not None:
        method = "neo"
    methods = [method] if method else list(DEFAULT_MATRIX)
    cfgs = []
    for seed_offset in range(seeds):
        for m in methods:
            cfg = dataclasses.replace(base, method=m, variant=variant, seed=base.seed + seed_offset)
            cfgs.append(validate(cfg))
    return cfgs


def execute(cfg: RunConfig, run_id: Optional[str] = None, after_step=None, resume: bool = False) -> dict:
    """Train one run, write its directory, then evaluate the student; returns its metrics.

    ``after_step(step, student, ws)`` runs between optimizer steps (an ablation trial reports
    its intermediate held-out NLL there); an exception it raises discards the run. ``resume``
    continues the unfinished run ``run_id`` from its last checkpoint. Under torchrun every rank
    calls this; rank 0 writes the run and evaluates, the others return ``{}`` after training.
    A stop signal ends it at a safe point with :class:`neobench.core.stopping.Stopped` (its message says
    what was kept).
    """
    from neobench.training.memory import keep_freed_memory

    keep_freed_memory()
    with STOP.watching("setup"):  # `neobench run` watches already; a library caller gets the same path
        return _execute(cfg, run_id, after_step, resume)


def _execute(cfg: RunConfig, run_id: Optional[str], after_step, resume: bool) -> dict:
    from neobench.evaluation.catalog import FIDELITY, EvalSpec, load_tasks
    from neobench.runs.store import FAILURE_FILE
    from neobench.training import checkpoint as ckpt
    from neobench.training.distributed import broadcast_object
    from neobench.training.loop import WEIGHTS_FILE, Diverged, planned_steps, train
    from neobench.training.workspace import prepare

    method = METHODS.get(cfg.method)
    started = time.perf_counter()
    spec = EvalSpec.from_config(cfg)
    ws = prepare(cfg, need_teacher=method.uses_teacher or FIDELITY in spec.tasks, fidelity=FIDELITY in spec.tasks)
    signal_point("setup")  # a stop requested from here on is acted on at the first step (neobench.core.stopping)
    world = ws.world
    if world.main:
        console.print(f"[dim]{ws.data.report.summary()}[/dim]", highlight=False)
    # Task names and data are checked before training, so a missing data set costs seconds, not a run.
    taskset = load_tasks(spec, ws.student_path) if spec.tasks and world.main else None
    run_id = broadcast_object(run_id or new_run_id(cfg), world)  # one id: each rank would stamp its own
    checkpoint, resume_rows, regrouped = None, None, False
    if resume:
        checkpoint = ckpt.latest(Path(cfg.runs_dir) / f".tmp-{run_id}")
        saved = ckpt.read_state(checkpoint)
        resume_rows = saved["step"]
        cfg, regrouped = same_global_batch(cfg, saved["world_size"], world.size), saved["world_size"] != world.size
        if world.main:
            console.print(f"resuming {run_id} from step {resume_rows} ({checkpoint})", highlight=False)
    with RunWriter(cfg.runs_dir, run_id, resume_rows=resume_rows, active=world.main) as writer:
        if not resume or regrouped:
            writer.write_config(cfg)
        # In a terminal, a live bar; in a log (CI, nohup, `> file`), plain lines: rich would print
        # only the bar's last state, squeezed into 80 columns, after minutes of silence.
        interactive = console.is_terminal
        progress = Progress(
            TextColumn(f"[bold]{run_label(cfg)} s{cfg.seed}"), BarColumn(bar_width=16),
            TextColumn("step {task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
            disable=not interactive or not world.main,
        )
        total = planned_steps(cfg, len(ws.data.examples), world.size)
        every = max(1, total // 20)  # at most about 20 lines per run in a log
        with progress:
            task = progress.add_task("train", total=total, info="", completed=resume_rows or 0)

            board = step_board(cfg.log_to, writer.tmp / "tensorboard") if world.main else None

            def on_step(row: dict) -> None:
                writer.log_step(row)
                if board is not None:
                    for key in BOARD_SCALARS:
                        if row.get(key) is not None:
                            board.add_scalar(f"train/{key}", row[key], row["step"])
                kd = f" kd {row['kd']:.3f}" if method.uses_teacher else ""
                info = f"loss {row['loss']:.3f} ce {row['ce']:.3f}{kd} | {row['tokens_per_s']:.0f} tok/s"
                progress.update(task, completed=row["step"], info=info)
                if not interactive and (row["step"] % every == 0 or row["step"] == total):
                    console.print(
                        f"{run_label(cfg)} s{cfg.seed} step {row['step']}/{total} {info}, {row['elapsed_s']:.0f} s", highlight=False
                    )

            hook = (lambda step, student: after_step(step, student, ws)) if after_step else None
            try:
                trained = train(cfg, ws, on_step, hook, run_tmp=writer.tmp, resume=checkpoint)
            except Diverged as err:
                # Kept (not a result: a dot-directory) so the log and any checkpoint can be inspected.
                writer.write_json(FAILURE_FILE, {"reason": "diverged", "message": str(err)})
                raise
            except Interrupted as stop:  # the writer keeps the run only if it has a checkpoint
                resume_command = f"neobench run --resume {run_id} --runs-dir {cfg.runs_dir}"
                raise stopped_in_training(stop.step, stop.checkpoint, resume_command) from None
            finally:
                if board is not None:
                    board.close()  # before the run directory is renamed into place
        if cfg.save_weights:  # a stop requested from here on lets the run be written, then skips its scoring
            writer.write_tensors(WEIGHTS_FILE, trained.weights)
        signal_point("final-write")
        metrics = {
            "run_id": run_id, "preset": cfg.preset, "method": cfg.method, "variant": cfg.effective_variant(),
            "seed": cfg.seed, "loss": ("reverse_kl" if method.on_policy else cfg.loss) if method.uses_teacher else None,
            "teacher": cfg.teacher, "student": cfg.student, "teacher_path": ws.teacher_path, "student_path": ws.student_path,
            **trained.record, "wall_seconds": time.perf_counter() - started, "versions": versions(),
        }
        writer.write_json("metrics.json", metrics)
    if not world.main:
        return {}
    run_dir = Path(cfg.runs_dir) / run_id
    metrics["run_dir"] = str(run_dir)
    if STOP.requested:
        raise stopped_after_training(run_dir, scored_later=taskset is not None)
    if taskset is not None:
        try:
            with STOP.in_phase("evaluation"):  # a stop signal ends scoring at once: the run is complete
                evaluate_student(cfg, ws, trained.student, run_dir, taskset)
        except KeyboardInterrupt:
            if not STOP.requested:
                raise
            raise stopped_after_training(run_dir, scored_later=True) from None
    return metrics


def same_global_batch(cfg: RunConfig, saved_world: int, world: int) -> RunConfig:
    """The run's config for ``world`` processes with the global batch it had on ``saved_world``: grad_accum absorbs the change."""
    if saved_world == world:
        return cfg
    total = cfg.grad_accum * saved_world
    if total % world:
        raise NeobenchError(
            f"the checkpoint was written by {saved_world} processes x grad_accum {cfg.grad_accum}; {world} processes cannot "
            f"keep that global batch ({total} micro-batches of {cfg.batch_size} per step); resume with a process count dividing {total}"
        )
    console.print(f"{saved_world} -> {world} processes: grad_accum {cfg.grad_accum} -> {total // world}, the same global batch", highlight=False)
    return dataclasses.replace(cfg, grad_accum=total // world)


BOARD_SCALARS = ("loss", "ce", "kd", "lr", "grad_norm", "tokens_per_s")


def step_board(target: str, log_dir: Path):
    """A TensorBoard SummaryWriter for ``--log-to tensorboard`` (the HF Trainer's report_to convention), else None."""
    if target != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


def evaluate_student(cfg: RunConfig, ws, student, run_dir: Path, taskset) -> dict:
    """Score a trained student and the reference models; store all rows in the run directory."""
    from neobench.evaluation.catalog import FIDELITY, lm_eval_version
    from neobench.evaluation.harness import evaluate, model_evaluation, scores_table, write_json_atomic
    from neobench.models.adapters import merged_copy
    from neobench.runs.store import evaluation_file

    spec = taskset.spec
    teacher = ws.teacher() if FIDELITY in spec.tasks else None
    console.print(f"evaluating {run_label(cfg)} on {', '.join(spec.tasks)} (limit {spec.limit or 'none'})", highlight=False)
    # Scored in the run's dtype: a bf16 run's student is evaluated with bf16 weights, like its references.
    evaluations = [evaluate(merged_copy(student, ws.dtype), ws.tokenizer, taskset, teacher=teacher, vocab_size=ws.vocab_size, role="student")]
    signal_point("evaluation")
    for role, path in (("teacher", ws.teacher_path), ("untrained_student", ws.student_path)):
        result = model_evaluation(
            role, path, taskset, ws.device, ws.dtype, model=teacher if role == "teacher" else None,
            teacher_path=ws.teacher_path, teacher=teacher, vocab_size=ws.vocab_size,
        )
        how = "cached reference scores" if result["cached"] else f"scored in {result['seconds']:.0f} s"
        console.print(f"[dim]{role}: {how}[/dim]", highlight=False)
        evaluations.append(result)
    payload = {"run_id": run_dir.name, "spec": spec.to_dict(), "lm_eval_version": lm_eval_version(), "evaluations": evaluations}
    target = evaluation_file(run_dir, spec)
    write_json_atomic(target, payload)
    console.print(scores_table(score_rows(payload, run_label(cfg))))
    console.print(f"[dim]student scored in {evaluations[0]['seconds']:.0f} s; written to {target}[/dim]", highlight=False)
    return payload


def score_rows(payload: dict, student_label: str) -> list[tuple[str, list[dict]]]:
    """(label, rows) per model of a stored evaluation: teacher, untrained student, then the student."""
    labels = {"teacher": "teacher", "untrained_student": "untrained", "student": student_label}
    by_role = {e["role"]: e["rows"] for e in payload["evaluations"]}
    return [(labels[role], by_role[role]) for role in ("teacher", "untrained_student", "student") if role in by_role]


class ChildDiverged(Exception):
    """A run process of execute_many diverged (exit DIVERGED_EXIT) after ``finished`` runs completed."""

    def __init__(self, finished: int):
        super().__init__(f"diverged after {finished} finished runs")
        self.finished = finished


def execute_many(cfgs: list[RunConfig], nproc: int = 1) -> list[dict]:
    """Run each config in its own `neobench run` process, or torchrun of ``nproc`` (see the module docstring)."""
    from neobench.training.workspace import prepare

    from neobench.evaluation.catalog import FIDELITY, EvalSpec, load_tasks

    spec = EvalSpec.from_config(cfgs[0])
    # Build shared artefacts (dequantized teacher, pruned student) once, before the children start.
    ws = prepare(cfgs[0], need_teacher=any(METHODS.get(c.method).uses_teacher for c in cfgs) or FIDELITY in spec.tasks,
                 fidelity=FIDELITY in spec.tasks)
    if ws.cross_vocabulary:  # prepare checked the first run only: a kd run must not fail after sft has trained
        from neobench.training.workspace import check_cross_vocabulary

        for cfg in cfgs[1:]:
            check_cross_vocabulary(cfg, ws.teacher_tokenizer, ws.tokenizer)
    if spec.tasks:  # fail on a bad task name or missing data before the first run trains
        load_tasks(spec, ws.student_path)
    fill_teacher_caches(cfgs, ws, nproc)
    results = []
    for i, cfg in enumerate(cfgs, 1):
        if STOP.requested:
            raise Stopped(f"stopped before run {i}/{len(cfgs)}; {finished_runs(results, cfg.runs_dir)}")
        if len(cfgs) > 1:
            console.rule(f"[bold]run {i}/{len(cfgs)}: {run_label(cfg)} seed {cfg.seed}")
        run_id = new_run_id(cfg)
        code = run_in_child(cfg, run_id, nproc=nproc)
        if code != 0 and (STOP.requested or code == STOPPED_EXIT):  # the run process said what it kept
            raise Stopped(f"stopped at run {i}/{len(cfgs)}; {finished_runs(results, cfg.runs_dir)}")
        if code == DIVERGED_EXIT:  # the run said why, in one line; say nothing more for one run
            raise ChildDiverged(len(results))
        if code != 0:
            raise NeobenchError(f"run {run_label(cfg)} seed {cfg.seed} failed (exit {code}); finished runs are kept in {cfg.runs_dir}")
        results.append({**read_run(Path(cfg.runs_dir) / run_id), "run_dir": str(Path(cfg.runs_dir) / run_id)})
    return results


def fill_teacher_caches(cfgs: list[RunConfig], ws, nproc: int = 1) -> None:
    """Run the teacher once over the examples the planned runs will read, for every teacher cache they use,
    so that across a matrix (methods, seeds, budgets) the teacher runs once per example.

    Left to the runs themselves under FSDP (the teacher may only fit sharded) and for data other than
    the workspace's; on CUDA the parent's cached memory is released before the runs start.
    """
    import gc

    import torch

    from neobench.data.examples import example_order
    from neobench.training.loop import planned_steps
    from neobench.training.teacher_cache import CacheMode, TeacherCache, fill

    keys: dict[tuple[str, float], set[int]] = {}
    n = len(ws.data.examples)
    for cfg in cfgs:
        method = METHODS.get(cfg.method)
        if not (method.uses_teacher and not method.on_policy and cfg.teacher_cache != "off"):
            continue
        if (cfg.train_data, cfg.train_split, cfg.seq_len, cfg.max_examples) != (
                cfgs[0].train_data, cfgs[0].train_split, cfgs[0].seq_len, cfgs[0].max_examples):
            return  # other data than the workspace's: each run fills its own entries as it goes
        if nproc > 1 and cfg.strategy == "fsdp":
            return
        per_step = cfg.batch_size * cfg.grad_accum * nproc
        read = example_order(n, planned_steps(cfg, n, nproc) * per_step, cfg.seed)
        keys.setdefault((cfg.teacher_cache, cfg.temperature), set()).update(read)
    for (mode, temperature), indices in sorted(keys.items()):
        cache = TeacherCache.for_run(CacheMode.parse(mode), ws.teacher_path, ws.data.data_hash, cfgs[0].seq_len, temperature,
                                     ws.teacher_vocab, ws.dtype, ws.tokenizer_fingerprints)
        ran = fill(cache, ws, sorted(indices))
        if ran:
            console.print(f"teacher cache ({mode}): the teacher ran on {ran} examples; every run reads them from {cache.root}",
                          highlight=False)
    ws._teacher = ws._teacher_head = None  # the runs are other processes: free it here
    gc.collect()
    if ws.device.startswith("cuda"):
        torch.cuda.empty_cache()


TORCHRUN_SHUTDOWN_SECONDS = 600


def finished_runs(results: list, runs_dir: str) -> str:
    return f"the {len(results)} runs finished before it stay in {runs_dir}/" if results else "no run had finished"


def run_in_child(
    cfg: RunConfig, run_id: str, extra_args: tuple[str, ...] = (), nproc: int = 1, resolved: bool = True
) -> int:
    """Train and evaluate ``cfg`` in a fresh `neobench run` process (``nproc`` > 1: under torchrun); returns its exit code.

    ``resolved=False``: ``extra_args`` alone say what to run (``--resume RUN_ID``), no config file is passed.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg.to_dict(), f)
    launcher = [sys.executable, "-m", "neobench.cli"]
    if nproc > 1:
        # --standalone: a rendezvous on a free local port; one node, nproc processes. A stop reaches
        # torchrun once, forwarded by this process (its own session: a terminal's Ctrl-C would be a
        # second signal, which ends torchrun's wait for its ranks); it passes it to every rank and
        # waits for them to finish their step and checkpoint (--shutdown-timeout; 30 s by default).
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    f"--shutdown-timeout={TORCHRUN_SHUTDOWN_SECONDS}", "-m", "neobench.cli"]
    what = ("--preset", f.name, "--run-id", run_id) if resolved else ()
    child = subprocess.Popen([*launcher, "run", *what, *extra_args], start_new_session=nproc > 1)
    try:
        # Under `neobench run` the stop handler passes any signal on to the child, which stops at
        # its next safe point and says what it kept (neobench.core.stopping); this process waits for it.
        with STOP.in_phase("runs"), STOP.forwarding_to(child):
            return child.wait()
    except KeyboardInterrupt:
        # Without that handler (`neobench ablate`), or a second signal: a terminal's Ctrl-C reached
        # the child too, a signal sent to this process alone did not. Wait for the child; a further
        # Ctrl-C here stops it at once.
        if not STOP.watched:  # the handler has passed it on already
            child.send_signal(signal.SIGINT)
        try:
            child.wait()
        except KeyboardInterrupt:
            child.kill()
        raise
    finally:
        Path(f.name).unlink()


def summary_table(results: list[dict]) -> Table:
    """One row per run; fits 80 columns (logs and pipes get no wider)."""
    from rich import box

    table = Table(title="neobench runs", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=0)
    for col in ("method", "seed", "steps", "tokens", "s/step", "tok/s", "peak", "trained", "CE", "KD"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for r in results:
        budget, cost, final = r["budget"], r["cost"], r["final"]
        table.add_row(
            f"{r['method']}+{r['variant']}" if r["variant"] else r["method"], str(r["seed"]),
            f"{budget['steps']}/{budget['planned_steps']}", f"{budget['tokens'] / 1000:.1f}k",
            f"{cost['seconds_per_step']:.1f}", f"{cost['tokens_per_second']:.0f}",
            f"{cost['peak_memory_bytes'] / 2**30:.2f}G", f"{cost['trainable_params'] / 1e6:.1f}M",
            f"{final['ce']:.3f}", f"{final['kd']:.3f}" if r["loss"] else "-",
        )
    return table


def matrix_scores(results: list[dict]):
    """One scores table for a matrix: reference rows once, then every run's student."""
    import json

    from neobench.evaluation.harness import scores_table

    labelled: list[tuple[str, list[dict]]] = []
    for i, r in enumerate(results):
        files = sorted((Path(r["run_dir"]) / "evaluations").glob("*.json"))
        if not files:
            continue
        payload = json.loads(files[0].read_text())
        label = f"{r['method']}+{r['variant']}" if r["variant"] else r["method"]
        rows = score_rows(payload, f"{label} s{r['seed']}")
        labelled += rows if not labelled else rows[-1:]
    return scores_table(labelled) if labelled else None
