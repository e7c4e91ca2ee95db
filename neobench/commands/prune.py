"""`neobench student prune`: the teacher depth-pruned into a student (cached; `--student pruned:KEEP` uses it)."""

from __future__ import annotations

from neobench.core.progress import console


def prune_command(keep: int, teacher: str, data: str, split: str) -> None:
    """Prune ``teacher`` to ``keep`` layers (cached) and say which were kept."""
    import json

    from neobench.models.loading import resolve_model
    from neobench.training.prune import pruned_student_dir

    out = pruned_student_dir(resolve_model(teacher), keep, data, split)
    card = json.loads((out / "prune_card.json").read_text())
    console.print(f"kept layers {card['kept_layers']} ({card['parameters'] / 1e6:.1f}M parameters)")
    console.print(f"student written to {out}")
