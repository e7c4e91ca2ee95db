"""`neobench export`: a run's student written where other tools load it (a peft adapter, or a
transformers model)."""

from __future__ import annotations

from pathlib import Path

from neobench.core.progress import console


def export_command(run: str, runs_dir: str, out: Path, merged: bool) -> None:
    """Export a run's student (a peft adapter, or a merged transformers model) and say what was written."""
    from neobench.runs.export import export_run

    result = export_run(run, runs_dir, out, merged)
    console.print(
        f"exported {result['kind']} to {out}/: {len(result['files'])} files, {result['bytes'] / 2**20:.1f} MiB, "
        f"{result['seconds']:.0f} s", highlight=False,
    )
