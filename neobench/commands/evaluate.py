"""`neobench eval`: a stored run's student scored again, or any model scored (cached by content)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from neobench.core.errors import NeobenchError
from neobench.core.progress import console


def evaluate_command(run: Optional[str], model: Optional[str], preset: str, flags: dict, runs_dir: str, out: Optional[Path]) -> None:
    """Score --run's student (its tasks, or the flags') or --model, and write the results to --out too."""
    from neobench.runs.rescore import evaluate_model, evaluate_run

    if (run is None) == (model is None):
        raise NeobenchError("give exactly one of --run RUN_ID or --model PATH_OR_ID")
    flags = {k: v for k, v in flags.items() if v is not None}
    payload = evaluate_run(run, runs_dir, flags) if run else evaluate_model(model, preset, flags)
    if out:
        from neobench.evaluation.harness import write_json_atomic

        write_json_atomic(out, payload)
        console.print(f"results written to {out}", highlight=False)
