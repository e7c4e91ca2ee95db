"""Planning and executing runs: `neobench run` trains each run in its own process.

The parent validates the inputs and builds the shared artefacts (dequantized teacher, pruned
student) once; then every run gets a fresh `neobench run` process, so its peak memory is its own.
A process that has trained KD keeps the freed pages of its optimizer state in its heap, which
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

from neobench.config import RunConfig, validate
from neobench.errors import NeobenchError
from neobench.methods import DEFAULT_MATRIX, METHODS
from neobench.progress import console
from neobench.runs import RunWriter, new_run_id, read_run, versions


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


def run_label(cfg: RunConfig) -> str:
    variant = cfg.effective_variant()
    return f"{cfg.method}+{variant}" if variant else cfg.method


def execute(cfg: RunConfig, run_id: Optional[str] = None) -> dict:
    """Train one run and write its directory; returns its metrics."""
    from neobench.train import prepare, train

    method = METHODS.get(cfg.method)
    started = time.perf_counter()
    ws = prepare(cfg, need_teacher=method.uses_teacher)
    console.print(f"[dim]{ws.data.report.summary()}[/dim]", highlight=False)
    run_id = run_id or new_run_id(cfg)
    with RunWriter(cfg.runs_dir, run_id) as writer:
        writer.write_config(cfg)
        progress = Progress(
            TextColumn(f"[bold]{run_label(cfg)} s{cfg.seed}"), BarColumn(bar_width=16),
            TextColumn("step {task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
        )
        from neobench.train import planned_steps

        with progress:
            task = progress.add_task("train", total=planned_steps(cfg, len(ws.data.examples)), info="")

            def on_step(row: dict) -> None:
                writer.log_step(row)
                kd = f" kd {row['kd']:.3f}" if method.uses_teacher else ""
                progress.update(task, completed=row["step"], info=f"loss {row['loss']:.3f} ce {row['ce']:.3f}{kd} | {row['tokens_per_s']:.0f} tok/s")

            _, _, record = train(cfg, ws, on_step)
        metrics = {
            "run_id": run_id, "preset": cfg.preset, "method": cfg.method, "variant": cfg.effective_variant(),
            "seed": cfg.seed, "loss": cfg.loss if method.uses_teacher else None,
            "teacher": cfg.teacher, "student": cfg.student, "teacher_path": ws.teacher_path, "student_path": ws.student_path,
            **record, "wall_seconds": time.perf_counter() - started, "versions": versions(),
        }
        writer.write_json("metrics.json", metrics)
    metrics["run_dir"] = str(Path(cfg.runs_dir) / run_id)
    return metrics


def execute_many(cfgs: list[RunConfig]) -> list[dict]:
    """Run each config in its own `neobench run` process (see the module docstring)."""
    from neobench.train import prepare

    # Build shared artefacts (dequantized teacher, pruned student) once, before the children start.
    prepare(cfgs[0], need_teacher=any(METHODS.get(c.method).uses_teacher for c in cfgs))
    results = []
    for i, cfg in enumerate(cfgs, 1):
        if len(cfgs) > 1:
            console.rule(f"[bold]run {i}/{len(cfgs)}: {run_label(cfg)} seed {cfg.seed}")
        run_id = new_run_id(cfg)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(cfg.to_dict(), f)
        cmd = [sys.executable, "-m", "neobench.cli", "run", "--preset", f.name, "--run-id", run_id]
        child = subprocess.Popen(cmd)
        try:
            code = child.wait()
        except KeyboardInterrupt:
            # Let the child discard its unfinished run directory before we stop.
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
            raise
        finally:
            Path(f.name).unlink()
        if code != 0:
            raise NeobenchError(f"run {run_label(cfg)} seed {cfg.seed} failed (exit {code}); finished runs are kept in {cfg.runs_dir}")
        results.append({**read_run(Path(cfg.runs_dir) / run_id), "run_dir": str(Path(cfg.runs_dir) / run_id)})
    return results


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
