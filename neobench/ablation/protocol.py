"""The tuned protocol's rule: which studies tune the learning rate, and how a rate is chosen.

Shared by the ablation stage (`neobench run --protocol tuned` reads the studies' choice) and the
reporting stage (the leaderboard's tuned tables apply the same rule to the stored rows), so it
lives below both.
"""

from __future__ import annotations

from typing import Optional

TUNING_STUDY = "tune-lr"
"""The study whose best trial per method (sft, lora, kd, neo) sets that method's lr_scale under `--protocol tuned`."""
TUNING_STUDIES = (TUNING_STUDY, "tune-lr-variants")
"""Every study the tuned protocol reads: the methods, then LLM-Neo's adapter variants (neo+dora, ...). Each
label is tuned in one of them, on the same grid of multiples, so one completeness rule serves both."""


def best_lr_scales(trials: list[tuple[str, float, float]], minimize: bool) -> dict[str, float]:
    """(label, lr_scale, objective) of finished trials -> label: the lr_scale of its best objective.

    Ties go to the smaller scale. A label whose search is not complete (fewer rates tried than the
    most-tried label) gets no choice yet. neobench.reporting.protocols applies this same function to the stored rows.
    """
    tried: dict[str, set] = {}
    for label, scale, _ in trials:
        tried.setdefault(label, set()).add(scale)
    most = max((len(s) for s in tried.values()), default=0)
    best: dict[str, tuple[float, float]] = {}
    for label, scale, value in trials:
        if len(tried[label]) < most:
            continue
        key = (value if minimize else -value, scale)
        if label not in best or key < best[label]:
            best[label] = key
    return {label: scale for label, (_, scale) in best.items()}


def study_for(label: str, studies: tuple[str, ...]) -> Optional[str]:
    """The shipped tuning study that tunes ``label``: the methods' own, LLM-Neo's adapter variants'
    (neo+dora, ...), or none (lora+dora and the like are not searched)."""
    if "+" not in label:
        return studies[0]
    return studies[1] if label.startswith("neo+") else None
