"""`neobench report`: runs collected into each preset's tidy rows, then every table, plot and
study report rebuilt from the rows alone."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from neobench.core.errors import NeobenchError
from neobench.core.progress import console


def report_command(runs: Path, out: Path, format: str, preset: Optional[str], replace: bool) -> None:
    """Collect the runs under ``runs`` into OUT/<preset>/, then rebuild every preset's leaderboard."""
    from neobench.reporting.formats import FORMATS
    from neobench.runs.results import (
        load_curves, load_per_doc, load_results, read_curves, read_per_doc, read_rows, replace_runs, run_dirs, tidy,
        tidy_curves, tidy_per_doc, write_curves, write_per_doc, write_rows,
    )

    formats = tuple(f.strip() for f in format.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise NeobenchError(f"unknown format {unknown[0] if unknown else format!r}; valid: {', '.join(FORMATS)}")
    found = run_dirs(runs)
    unscored = [d for d in found if not any((d / "evaluations").glob("*.json"))]
    fresh = load_results(runs)
    if preset:
        fresh = fresh[fresh["preset"] == preset]
    fresh_curves = load_curves(runs)
    fresh_per_doc = load_per_doc(runs)
    for name, rows in fresh.groupby("preset", sort=True):
        path = out / name / "results.jsonl"
        kept = path.is_file() and not replace
        write_rows(replace_runs(read_rows(path) if kept else rows.iloc[0:0], rows, tidy), path)
        curves = fresh_curves[fresh_curves["run_id"].isin(set(rows["run_id"]))]
        curves_path = out / name / "curves.jsonl"
        write_curves(replace_runs(read_curves(curves_path) if kept else curves.iloc[0:0], curves, tidy_curves), curves_path)
        per_doc_path = out / name / "per_doc.csv"
        per_doc = fresh_per_doc[fresh_per_doc["run_id"].isin(set(rows["run_id"]))]
        write_per_doc(replace_runs(read_per_doc(per_doc_path) if kept else per_doc.iloc[0:0], per_doc, tidy_per_doc), per_doc_path)
        console.print(f"collected {rows['run_id'].nunique()} runs of {name} from {runs}/", highlight=False)
    presets = sorted(p.parent.name for p in out.glob("*/results.jsonl") if not preset or p.parent.name == preset)
    if unscored:
        how = unscored_hint(unscored, len(found), runs)
        if not presets:
            raise NeobenchError(f"{how}; nothing to report until one is scored")
        console.print(f"[yellow]{how}[/yellow]", highlight=False)
    if not presets:
        raise NeobenchError(f"no runs under {runs}/ and no results in {out}/; train some with `neobench run` first")
    from neobench.ablation.export import export_studies
    from neobench.ablation.storage import STORAGE_FILE
    from neobench.reporting.ablations import render_all
    from neobench.reporting.leaderboard import left_out_lines, render

    for name in presets:
        rows = read_rows(out / name / "results.jsonl")
        students = rows[rows["model"] == "student"]
        if len(students) and students["study"].notna().all():
            console.print(f"[bold]{name}[/bold]: only ablation trials, no leaderboard tables", highlight=False)
            continue
        result = render(rows, name, out / name, formats, curves=read_curves(out / name / "curves.jsonl"),
                        per_doc=read_per_doc(out / name / "per_doc.csv"))
        console.print(f"[bold]{name}[/bold]: {len(result.files)} files in {out / name}/", highlight=False)
        for line in left_out_lines(result.left_out, markdown=False):
            console.print(f"  left out {line}", highlight=False, markup=False)
    if (runs / STORAGE_FILE).is_file():  # studies run with the default storage beside these runs
        export_studies(f"sqlite:///{(runs / STORAGE_FILE).resolve()}", out, per_doc=fresh_per_doc)
    ablation_files = render_all(out, preset)
    if ablation_files:
        n = sum(f.suffix == ".md" for f in ablation_files)
        console.print(f"ablations: {n} {'study' if n == 1 else 'studies'}, {len(ablation_files)} files in {out}/<preset>/ablations/", highlight=False)


def unscored_hint(unscored: list[Path], found: int, runs: Path) -> str:
    """One line: how many runs have no scores yet, why, and the command that scores them."""
    some = "it has" if found == 1 else f"{len(unscored)} of them {'has' if len(unscored) == 1 else 'have'}"
    which = "it" if len(unscored) == 1 else "each"
    more = f" (and likewise the {len(unscored) - 1} others)" if len(unscored) > 1 else ""
    return (
        f"found {found} run{'s' if found != 1 else ''} under {runs}/, but {some} no evaluation yet "
        f"(trained with --tasks none?); score {which} with `neobench eval --run {unscored[0]}`{more}, "
        f"then run `neobench report --runs {runs}` again"
    )
