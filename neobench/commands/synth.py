"""`neobench data synth`: a Magpie data set written by the teacher (resumable)."""

from __future__ import annotations

from pathlib import Path

from neobench.core.progress import console


def synth_command(out: Path, teacher: str, n_train: int, n_heldout: int, seed: int, batch_size: int) -> None:
    """Write (or continue) a Magpie data set from ``teacher`` under ``out`` (default: the packaged one)."""
    from neobench.core.progress import CountProgress
    from neobench.data.synth import SynthConfig, packaged_dataset, synthesize

    cfg = SynthConfig(teacher=teacher, n_train=n_train, n_heldout=n_heldout, seed=seed, batch_size=batch_size)
    out = out or packaged_dataset()
    with CountProgress("synthesizing") as progress:
        card = synthesize(cfg, out, progress)
    console.print(f"wrote {card['files']['train.jsonl']['rows']} train + {card['files']['heldout.jsonl']['rows']} held-out rows to {out}")
