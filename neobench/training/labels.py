"""How a run is named: in the terminal (run_label: neo+lora) and on the leaderboard (label_of: neo).

Below every stage that names runs (training's messages, experiments, ablations, reports), so
none of them imports another to spell a name.
"""

from __future__ import annotations

import math
from typing import Optional


def given(value) -> bool:
    """Not None/NaN (pandas turns a missing string into NaN)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def run_label(cfg) -> str:
    """method+variant of a RunConfig for terminal lines and progress bars (neo+lora, kd)."""
    variant = cfg.effective_variant()
    return f"{cfg.method}+{variant}" if variant else cfg.method


OWN_LOSS = {"minillm": "reverse_kl"}
"""Methods whose divergence is part of their definition (not shown in their label)."""


def label_of(method: str, variant: Optional[str], loss: Optional[str]) -> str:
    """sft, kd, lora, neo; neo+dora for other adapter variants; minillm+lora for an adapter
    on a method that can train all weights; "(loss)" for a divergence other than the method's own."""
    from neobench.training.methods import METHODS

    adapter_only = method in METHODS and METHODS.get(method).trains == "adapter"
    name = method if not given(variant) or (variant == "lora" and adapter_only) else f"{method}+{variant}"
    return name if not given(loss) or loss == OWN_LOSS.get(method, "forward_kl") else f"{name} ({loss})"
