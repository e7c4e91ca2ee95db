"""Checkpoints inside an unfinished run, and exact resume from them.

    runs/.tmp-<run_id>/                 the unfinished run (see neobench.runs.store)
        checkpoint/latest               name of the newest complete checkpoint (replaced atomically)
        checkpoint/step-000006/         torch.distributed.checkpoint (DCP) files: one per rank
            rng-rank0.pt ...            Python, NumPy, torch (and CUDA) RNG states of each rank
            state.json                  step, counters, world size, strategy

What is saved: the weights that train (an adapter run saves its adapter only, never the frozen
base: DCP's ``ignore_frozen_params``) and their optimizer state, the LR schedule, the step (the
data cursor: the example order is a function of the seed, so the step fixes the position), the
running counters of the run record, and every rank's RNG states. The model and optimizer state go
through DCP, so a checkpoint written by 2 ranks (DDP or FSDP) loads on 1 or on 4: DCP reshards.

A checkpoint is complete once ``latest`` names it; a process killed while writing one leaves the
previous checkpoint in charge. Older checkpoints are removed after the new one is in place.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Optional

import warnings

import numpy as np
import torch

from neobench.training.distributed import World, barrier, inner

CHECKPOINT_DIR = "checkpoint"
LATEST = "latest"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _dcp_state(wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(wrapped, optimizer, options=options)
    # ignore_frozen_params keeps a frozen weight that is tied to another (an adapter run's tied
    # lm_head: 113 MB of SmolLM2 in every checkpoint): keep exactly the trainable ones.
    trainable = {name for name, p in inner(wrapped).named_parameters() if p.requires_grad}
    return {"model": {k: v for k, v in model_state.items() if k in trainable}, "optim": optim_state}


def save(
    run_tmp: Path, step: int, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, counters: dict,
    world: World, strategy: str,
) -> Path:
    """Write the checkpoint of ``step`` (every rank calls this); returns its directory."""
    import torch.distributed.checkpoint as dcp

    root = Path(run_tmp) / CHECKPOINT_DIR
    target = root / f"step-{step:06d}"
    if world.main:
        shutil.rmtree(target, ignore_errors=True)  # a half-written one from a killed save
        target.mkdir(parents=True)
    barrier(world)
    with warnings.catch_warnings():  # DCP warns that one process is one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_dcp_state(wrapped, optimizer), checkpoint_id=str(target), no_dist=not world.distributed)
    with open(target / f"rng-rank{world.rank}.pt", "wb") as f:
        pickle.dump(_rng_state(), f)
    barrier(world)
    if world.main:
        state = {"step": step, "counters": counters, "scheduler": scheduler.state_dict(), "world_size": world.size,
                 "strategy": strategy}
        (target / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(target.name + "\n")
        os.replace(pointer, root / LATEST)
        for old in root.glob("step-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return target


def latest(run_tmp: Path) -> Optional[Path]:
    """The newest complete checkpoint of an unfinished run, or None."""
    pointer = Path(run_tmp) / CHECKPOINT_DIR / LATEST
    if not pointer.is_file():
        return None
    target = pointer.parent / pointer.read_text().strip()
    return target if (target / "state.json").is_file() else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / "state.json").read_text())


def load(checkpoint: Path, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, world: World) -> dict:
    """Restore weights, optimizer and schedule from ``checkpoint``; returns its state.json.

    RNG states are restored separately (:func:`restore_rng`), right before the next step, so
    nothing that draws random numbers in between (building the teacher, say) shifts them.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _dcp_state(wrapped, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=not world.distributed)
    set_state_dict(
        wrapped, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    saved = read_state(checkpoint)
    scheduler.load_state_dict(saved["scheduler"])
    return saved


def restore_rng(checkpoint: Path, world: World) -> None:
    """This rank's RNG states; a rank the checkpoint did not have (more processes now) takes rank 0's."""
    path = Path(checkpoint) / f"rng-rank{world.rank}.pt"
    if not path.is_file():
        path = Path(checkpoint) / "rng-rank0.pt"
    with open(path, "rb") as f:
        _set_rng_state(pickle.load(f))


def size_bytes(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in Path(checkpoint).rglob("*") if p.is_file())
