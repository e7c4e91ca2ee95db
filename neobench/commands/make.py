"""`neobench student prune` and `neobench data synth`: what is made from the teacher before any
run, a depth-pruned student and a synthesized data set."""

from __future__ import annotations

from pathlib import Path

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


def synth_command(out: Path, teacher: str, n_train: int, n_heldout: int, seed: int, batch_size: int) -> None:
    """Write (or continue) a Magpie data set from ``teacher`` under ``out`` (default: the packaged one)."""
    from neobench.core.progress import CountProgress
    from neobench.data.synth import SynthConfig, packaged_dataset, synthesize

    cfg = SynthConfig(teacher=teacher, n_train=n_train, n_heldout=n_heldout, seed=seed, batch_size=batch_size)
    out = out or packaged_dataset()
    with CountProgress("synthesizing") as progress:
        card = synthesize(cfg, out, progress)
    console.print(f"wrote {card['files']['train.jsonl']['rows']} train + {card['files']['heldout.jsonl']['rows']} held-out rows to {out}")
