"""`neobench ablate`: one study run to its number of trials (by local workers on one storage, or
as one of them), then its report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from neobench.core.progress import console


def ablate_command(study: str, trials: Optional[int], storage: Optional[str], workers: int, study_name: Optional[str],
                   runs_dir: Optional[str], report_: bool, out: Path, dtype: Optional[str], worker: int) -> None:
    """Run (or, as worker N, work on) the study, then write leaderboards/<preset>/ablations/<study>.md."""
    import shlex

    from neobench.ablation.export import export_studies
    from neobench.ablation.spec import load_spec, with_dtype
    from neobench.ablation.worker import run_study, work
    from neobench.reporting.ablations import render
    from neobench.runs.config import RunConfig

    spec = with_dtype(load_spec(study), dtype)
    if worker:
        work(spec, study_name or spec.name, storage, trials or spec.trials, runs_dir or RunConfig.runs_dir, worker)
        return
    command = "neobench ablate " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    try:
        the_study, storage_url = run_study(spec, trials, storage, workers, study_name, runs_dir, command)
    except KeyboardInterrupt:
        console.print(f"interrupted: the unfinished trial is queued again; `neobench ablate {study}` continues the study")
        raise typer.Exit(130) from None
    if report_:
        import json

        from neobench.runs.results import load_per_doc

        per_doc = load_per_doc(runs_dir or spec.base_config().runs_dir)
        for path in export_studies(storage_url, out, only=the_study.study_name, per_doc=per_doc):
            for file in render(json.loads(path.read_text()), path.parent):
                console.print(f"  {file}", highlight=False)
