"""The tuned protocol's learning rates: each method's lr_scale as its tuning studies chose it.

The rule that chooses (neobench.ablation.protocol) is pure; this reads the studies' finished trials
from their storage and applies it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from neobench.ablation.protocol import TUNING_STUDIES, best_lr_scales
from neobench.ablation.storage import default_storage, open_storage
from neobench.core.errors import NeobenchError
from neobench.runs.config import apply_overrides, load_preset


def tuned_lr_scales(runs_dir: str, storage: Optional[str] = None, study_names: tuple[str, ...] = TUNING_STUDIES) -> dict[str, float]:
    """label (as in the leaderboard: sft, lora, kd, neo, neo+dora, ...) -> the lr_scale the studies chose.

    The studies in ``study_names`` that the storage holds are read together (at least one must be there)."""
    import optuna
    from optuna.trial import TrialState

    from neobench.training.labels import label_of

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
