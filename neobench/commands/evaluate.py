"""`neobench eval` and `neobench export`: a stored student scored again, or any model scored; a
run's student written where other tools load it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from neobench.core.errors import NeobenchError
from neobench.core.progress import console


def evaluate_command(run: Optional[str], model: Optional[str], preset: str, flags: dict, runs_dir: str, out: Optional[Path]) -> None:
    """Score --run's student (its tasks, or the flags') or --model, and write the results to --out too."""
    from neobench.runs.experiment import evaluate_model, evaluate_run

    if (run is None) == (model is None):
        raise NeobenchError("give exactly one of --run RUN_ID or --model PATH_OR_ID")
    flags = {k: v for k, v in flags.items() if v is not None}
    payload = evaluate_run(run, runs_dir, flags) if run else evaluate_model(model, preset, flags)
    if out:
        from neobench.evaluation.harness import write_json_atomic

        write_json_atomic(out, payload)
        console.print(f"results written to {out}", highlight=False)


def export_command(run: str, runs_dir: str, out: Path, merged: bool) -> None:
    """Export a run's student (a peft adapter, or a merged transformers model) and say what was written."""
    from neobench.runs.export import export_run

    result = export_run(run, runs_dir, out, merged)
    console.print(
        f"exported {result['kind']} to {out}/: {len(result['files'])} files, {result['bytes'] / 2**20:.1f} MiB, "
        f"{result['seconds']:.0f} s", highlight=False,
    )
