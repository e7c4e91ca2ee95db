"""`neobench list`: every registry's names with what each is, and the config fields."""

from __future__ import annotations

from neobench.core.progress import console


def list_command(fields: bool) -> None:
    """Print the methods, variants, losses, tasks, presets and studies; with ``fields``, every config field."""
    from rich.table import Table

    from neobench.evaluation.catalog import SUITE_ALIAS, TASKS
    from neobench.models.adapters import VARIANTS
    from neobench.runs.config import PRESETS, RunConfig, field_docs
    from neobench.training.losses import DIVERGENCES
    from neobench.training.methods import METHODS

    table = Table(title="neobench registries", title_justify="left")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("what it is")
    for name, m in METHODS.items():
        table.add_row("method", name, f"{m.description} [trains {m.trains}]")
    for name in VARIANTS:
        table.add_row("variant", name, VARIANTS.get(name).description)
    for name in DIVERGENCES:
        table.add_row("loss", name, DIVERGENCES.get(name).description)
    for name, task in TASKS.items():
        table.add_row("task", name, f"{task.description} [{', '.join(task.metrics)}]")
    table.add_row("task", SUITE_ALIAS, "the neo_* tasks but neo_heldout_rougeL_sampled; any lm-eval task name also works")
    for name, path in PRESETS.items():
        first = next((l.lstrip("# ").strip() for l in path.read_text().splitlines() if l.startswith("#")), "")
        table.add_row("preset", name, first)
    from neobench.ablation.spec import study_files

    for name, path in study_files().items():
        first = next((l.lstrip("# ").strip() for l in path.read_text().splitlines() if l.startswith("#")), "")
        table.add_row("study", name, first)
    console.print(table)
    if fields:
        docs = field_docs()
        ftable = Table(title="config fields (preset YAML keys; --flag-name on the command line)", title_justify="left")
        for col in ("field", "default", "meaning"):
            ftable.add_column(col)
        for name, value in RunConfig().to_dict().items():
            ftable.add_row(name, repr(value), docs.get(name, ""))
        console.print(ftable)
