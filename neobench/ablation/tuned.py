"""The tuned protocol: each method at the learning rate its tuning study chose on the validation split.

    TUNING_STUDIES   the studies that tune the rate (tune-lr: the methods; tune-lr-variants: LLM-Neo's variants)
    best_lr_scales   the rule that picks a rate from finished trials; pure, so the reporting stage
                     applies the very same rule to the stored rows of the leaderboard's tuned tables
    tuned_lr_scales  the rates, read from the studies' storage
    tuned_configs    planned runs set to those rates (`neobench run --protocol tuned`)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from neobench.ablation.storage import default_storage, open_storage
from neobench.core.errors import NeobenchError
from neobench.core.progress import console
from neobench.runs.config import apply_overrides, load_preset
from neobench.training.labels import label_of

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


def tuned_lr_scales(runs_dir: str, storage: Optional[str] = None, study_names: tuple[str, ...] = TUNING_STUDIES) -> dict[str, float]:
    """label (as in the leaderboard: sft, lora, kd, neo, neo+dora, ...) -> the lr_scale the studies chose.

    The studies in ``study_names`` that the storage holds are read together (at least one must be there)."""
    import optuna
    from optuna.trial import TrialState

    url = storage or default_storage(runs_dir)
    hint = f"run `neobench ablate {study_names[0]} --runs-dir {runs_dir}` first"
    needs = f"the tuned protocol needs the {study_names[0]!r} study" + (
        f" (and {', '.join(repr(n) for n in study_names[1:])} for adapter variants)" if len(study_names) > 1 else "")
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise NeobenchError(f"{needs}, and {url} does not exist; {hint}")
    rows, directions = [], set()
    for study_name in study_names:
        try:
            study = optuna.load_study(study_name=study_name, storage=open_storage(url))
        except KeyError:
            continue
        directions.add(study.direction)
        # The study's own record of its preset and fixed settings (its file may have moved or changed).
        attrs = study.user_attrs
        base = apply_overrides(load_preset(attrs["preset"]), {**attrs.get("budget", {}), **attrs.get("fixed", {})}, f"study {study_name!r}")
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            cfg = apply_overrides(base, {k: v for k, v in t.params.items()}, f"trial {t.number}")
            rows.append((label_of(cfg.method, cfg.effective_variant(), None), cfg.lr_scale, float(t.value)))
    if not directions:
        raise NeobenchError(f"{needs}, which {url} does not hold; {hint}")
    if len(directions) > 1:
        raise NeobenchError(f"the tuning studies in {url} disagree on the direction of their objective; they cannot choose together")
    if not rows:
        raise NeobenchError(f"no tuning study in {url} has a finished trial yet; {hint}")
    return best_lr_scales(rows, minimize=directions == {optuna.study.StudyDirection.MINIMIZE})


def tuned_configs(cfgs: list, given: dict) -> list:
    """The planned runs, each at the lr_scale its tuning study chose (tune-lr; tune-lr-variants for LLM-Neo's variants)."""
    if "lr_scale" in given:
        raise NeobenchError("--protocol tuned sets each method's --lr-scale from the tune-lr study; leave --lr-scale out")
    scales = tuned_lr_scales(cfgs[0].runs_dir)
    tuned = []
    for cfg in cfgs:
        label = label_of(cfg.method, cfg.effective_variant(), None)
        if label not in scales:
            study = study_for(label, TUNING_STUDIES)
            how = (f"run `neobench ablate {study}` to finish it" if study else
                   "no shipped study searches it: copy ablations/tune-lr-variants.yaml with its method, and run that")
            raise NeobenchError(
                f"no tuning study has finished its search for {label} (they have chosen for: "
                f"{', '.join(sorted(scales)) or 'none yet'}); {how}"
            )
        if scales[label] != 1.0:  # at 1 the tuned run is the paper protocol's run: not trained twice
            tuned.append(dataclasses.replace(cfg, lr_scale=scales[label]))
    for label in dict.fromkeys(label_of(c.method, c.effective_variant(), None) for c in cfgs):
        same = " = the paper protocol's rate: its paper runs serve both protocols (`neobench run` trains them)"
        console.print(f"tuned protocol: {label} at lr_scale {scales[label]:g}{same if scales[label] == 1.0 else ''}", highlight=False)
    return tuned
