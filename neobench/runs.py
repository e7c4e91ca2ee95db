"""Run directories: how a run is written, found and read back.

    runs/<run_id>/
        config.yaml                   the resolved RunConfig
        train_log.jsonl               one row per optimizer step
        metrics.json                  budget, cost, final losses, data report, versions
        trained_weights.safetensors   the tensors training changed (see neobench.train.changed_weights)
        evaluations/<spec hash>.json  scores of the student and the reference models (neobench.evaluation)

A run is written under ``runs/.tmp-<run_id>/`` and renamed into place only when complete, so a
killed run never leaves a half-written result; readers skip dot-directories. Evaluations are
added afterwards, each file written atomically, so a failed evaluation never loses the run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from neobench.config import RunConfig


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


class RunWriter:
    """Writes one run directory atomically (use as a context manager)."""

    def __init__(self, runs_dir: str | Path, run_id: str):
        self.runs_dir = Path(runs_dir)
        self.run_id = run_id
        self.final = self.runs_dir / run_id
        self.tmp = self.runs_dir / f".tmp-{run_id}"

    def __enter__(self) -> "RunWriter":
        if self.final.exists():
            raise FileExistsError(f"run directory {self.final} already exists")
        self.tmp.mkdir(parents=True, exist_ok=False)
        self._log = (self.tmp / "train_log.jsonl").open("w")
        return self

    def write_config(self, cfg: RunConfig) -> None:
        (self.tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def log_step(self, row: dict) -> None:
        self._log.write(json.dumps(row) + "\n")
        self._log.flush()

    def write_tensors(self, name: str, tensors: dict) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(self.tmp / name))

    def write_json(self, name: str, payload: dict) -> None:
        (self.tmp / name).write_text(json.dumps(payload, indent=2, default=str) + "\n")

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._log.close()
        if exc_type is None:
            os.replace(self.tmp, self.final)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def read_run(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    return json.loads((run_dir / "metrics.json").read_text())
