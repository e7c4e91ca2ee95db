"""Run directories: how a run is written, found and read back.

    runs/<run_id>/
        config.yaml                   the resolved RunConfig
        train_log.jsonl               one row per optimizer step
        metrics.json                  budget, cost, final losses, data report, versions
        trained_weights.safetensors   the tensors training changed (see neobench.training.loop.changed_names)
        evaluations/<spec hash>.json  scores of the student and the reference models (neobench.evaluation.harness)

A run is written under ``runs/.tmp-<run_id>/`` and renamed into place only when complete, so a
killed run never leaves a half-written result; readers skip dot-directories. Evaluations are
added afterwards, each file written atomically, so a failed evaluation never loses the run.

An unfinished run stays under its dot-directory when it has something to come back to: a
checkpoint (``--save-every``; continue with ``neobench run --resume RUN_ID``) or, after a
divergence, ``failure.json`` saying where and why. Otherwise a failed run is removed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from neobench.core.errors import NeobenchError
from neobench.evaluation.catalog import EvalSpec, content_sha
from neobench.runs.config import RunConfig


def new_run_id(cfg: RunConfig) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return f"{cfg.preset}-{cfg.method}-{cfg.effective_variant() or 'full'}-s{cfg.seed}-{stamp}"


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    import neobench

    return {
        "neobench": neobench.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
    }


FAILURE_FILE = "failure.json"


class RunWriter:
    """Writes one run directory atomically (use as a context manager).

    ``resume_rows``: continue the unfinished run in place, keeping that many rows of its log (the
    steps its checkpoint holds). ``active=False`` (ranks other than 0) writes nothing but knows the
    paths, so every rank can write its share of a checkpoint.
    """

    def __init__(self, runs_dir: str | Path, run_id: str, resume_rows: int | None = None, active: bool = True):
        self.runs_dir = Path(runs_dir)
        self.run_id = run_id
        self.final = self.runs_dir / run_id
        self.tmp = self.runs_dir / f".tmp-{run_id}"
        self.resume_rows = resume_rows
        self.active = active

    def __enter__(self) -> "RunWriter":
        if not self.active:
            return self
        if self.final.exists():
            raise FileExistsError(f"run directory {self.final} already exists")
        if self.resume_rows is None:
            self.tmp.mkdir(parents=True, exist_ok=False)
            self._log = (self.tmp / "train_log.jsonl").open("w")
        else:  # the steps after the checkpoint are done again: drop their rows
            log = self.tmp / "train_log.jsonl"
            rows = log.read_text().splitlines(keepends=True)[: self.resume_rows] if log.is_file() else []
            log.write_text("".join(rows))
            self._log = log.open("a")
            (self.tmp / FAILURE_FILE).unlink(missing_ok=True)
        return self

    def write_config(self, cfg: RunConfig) -> None:
        if self.active:
            (self.tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def log_step(self, row: dict) -> None:
        if self.active:
            self._log.write(json.dumps(row) + "\n")
            self._log.flush()

    def write_tensors(self, name: str, tensors: dict) -> None:
        from safetensors.torch import save_file

        if self.active:
            save_file(tensors, str(self.tmp / name))

    def write_json(self, name: str, payload: dict) -> None:
        if self.active:
            (self.tmp / name).write_text(json.dumps(payload, indent=2, default=str) + "\n")

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.active:
            return False
        self._log.close()
        from neobench.training.checkpoint import CHECKPOINT_DIR, latest

        if exc_type is None:
            shutil.rmtree(self.tmp / CHECKPOINT_DIR, ignore_errors=True)  # a finished run needs none
            os.replace(self.tmp, self.final)
        elif latest(self.tmp) is None and not (self.tmp / FAILURE_FILE).is_file():
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def unfinished_run(runs_dir: str | Path, run_id: str) -> Path:
    """The directory of an unfinished run that can be resumed, or a one-line error saying why not."""
    from neobench.training.checkpoint import latest

    runs_dir = Path(runs_dir)
    run_id = Path(run_id).name.removeprefix(".tmp-")
    tmp = runs_dir / f".tmp-{run_id}"
    if (runs_dir / run_id).is_dir():
        raise NeobenchError(f"run {run_id} is finished (in {runs_dir}/{run_id}); there is nothing to resume")
    if not tmp.is_dir():
        found = sorted(p.name.removeprefix(".tmp-") for p in runs_dir.glob(".tmp-*") if latest(p) is not None)
        listing = f"; resumable runs there: {', '.join(found)}" if found else "; none there has a checkpoint"
        raise NeobenchError(f"no unfinished run {run_id!r} under {runs_dir}/{listing}")
    if latest(tmp) is None:
        raise NeobenchError(
            f"unfinished run {run_id} has no checkpoint (it ran without --save-every); it cannot be resumed, only run again"
        )
    return tmp


def read_run(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    return json.loads((run_dir / "metrics.json").read_text())


BOOKKEEPING = ("runs_dir", "log_to", "save_every", "save_weights", "strategy")
"""Config fields that say how a run was kept or watched, not what it trained or how it was scored."""


def finished_like(cfg: RunConfig) -> Optional[Path]:
    """A finished, scored run under cfg.runs_dir with exactly this configuration (seed included), if any."""
    wanted = {k: v for k, v in cfg.to_dict().items() if k not in BOOKKEEPING}
    root = Path(cfg.runs_dir)
    for run in sorted(root.iterdir()) if root.is_dir() else []:
        if run.name.startswith(".") or not (run / "metrics.json").is_file() or not (run / "config.yaml").is_file():
            continue
        stored = yaml.safe_load((run / "config.yaml").read_text()) or {}
        scored = cfg.eval_tasks == "none" or any((run / "evaluations").glob("*.json"))
        # A field the stored config lacks (it predates the field) had today's default.
        if scored and {k: v for k, v in {**RunConfig().to_dict(), **stored}.items() if k not in BOOKKEEPING} == wanted:
            return run
    return None


def find_run(run: str, runs_dir: str) -> Path:
    """A run directory from a path or a run id under ``runs_dir``."""
    for path in (Path(run), Path(runs_dir) / run):
        if (path / "config.yaml").is_file() and (path / "metrics.json").is_file():
            return path
    raise NeobenchError(f"no run {run!r}: not a run directory nor a run id under {runs_dir}/ (`ls {runs_dir}` lists them)")


def evaluation_file(run_dir: Path, spec: EvalSpec) -> Path:
    """Where a run keeps the results of one evaluation spec: evaluations/<spec hash>.json."""
    return Path(run_dir) / "evaluations" / f"{content_sha(spec.to_dict())[:12]}.json"
