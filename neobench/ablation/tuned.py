"""The tuned protocol: each method at the learning rate its tuning study chose on the validation split.

    TUNING_STUDIES   the studies that tune the rate (tune-lr: the methods; tune-lr-variants: LLM-Neo's
                     variants; tune-lr-epoch: the methods again at one epoch, the largest budget)
    best_lr_scales   the rule that picks a rate from finished trials; pure, so the reporting stage
                     applies the very same rule to the stored rows of the leaderboard's tuned tables
    nearest_tuned    which tuned budget a run of some budget takes its rate from (also pure, also shared)
    tuned_lr_scales  the rates, read from the studies' storage
    tuning_trials, tuned_choices
                     the same rule applied to stored result rows (the report's tuned tables)
    committed_tuning the rates that the tuning trials in a committed leaderboard chose (where no storage holds a study)
    tuned_configs    planned runs set to those rates (`neobench run --protocol tuned`)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from neobench.ablation.storage import default_storage, open_storage
from neobench.core.errors import NeobenchError
from neobench.core.progress import console
from neobench.runs.config import apply_overrides, load_preset
from neobench.training.labels import label_of

if TYPE_CHECKING:
    import pandas as pd

TUNING_STUDY = "tune-lr"
"""The study whose best trial per method (sft, lora, kd, neo) sets that method's lr_scale under `--protocol tuned`."""
TUNING_STUDIES = (TUNING_STUDY, "tune-lr-variants", "tune-lr-epoch")
"""Every study the tuned protocol reads: the methods, LLM-Neo's adapter variants (neo+dora, ...), and the methods
again at one epoch. Within one budget each label is tuned in one of them, on the same grid of multiples, so one
completeness rule serves all."""


@dataclass(frozen=True)
class TunedBudget:
    """The budget a tuning study trained its trials at."""

    max_steps: int
    """As configured: optimizer steps, or 0 for one epoch."""
    steps: int
    """Optimizer steps its trials took (for one epoch: as many as the data gave; 0 if not known yet)."""

    @property
    def name(self) -> str:
        return f"{self.steps} steps (E)" if self.max_steps == 0 else f"{self.steps} steps"

    def order(self) -> tuple[bool, int]:
        """Smallest first; one epoch after every fixed number of steps."""
        return (self.max_steps == 0, self.steps)


def nearest_tuned(max_steps: int, steps: int, tuned: list[TunedBudget]) -> TunedBudget:
    """The tuned budget whose rates a run of ``max_steps`` (0: one epoch; ``steps`` taken, 0 if not known) uses.

    Its own budget if a study tuned it; else the nearest tuned budget on a log scale of steps (ties: the
    smaller). An epoch whose length is not known yet takes the largest tuned budget.
    """
    same = [t for t in tuned if t.max_steps == max_steps and (max_steps or not steps or not t.steps or t.steps == steps)]
    if same:
        return same[0]
    known = [t for t in tuned if t.steps]
    if not steps or not known:
        return max(tuned, key=TunedBudget.order)
    return min(known, key=lambda t: (abs(math.log(t.steps) - math.log(steps)), t.steps))


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


def choices_by_budget(trials: list[tuple[TunedBudget, str, float, float]], minimize: bool) -> dict[TunedBudget, dict[str, float]]:
    """(budget, label, lr_scale, objective) of finished trials -> per budget, smallest first, best_lr_scales of its
    trials; a budget that chose nothing yet is left out."""
    found = {}
    for budget in sorted({t[0] for t in trials}, key=TunedBudget.order):
        choice = best_lr_scales([(label, scale, value) for b, label, scale, value in trials if b == budget], minimize)
        if choice:
            found[budget] = choice
    return found


class NoTuningStudy(NeobenchError):
    """The storage holds none of the tuning studies (as opposed to holding one that has not chosen yet)."""


def budget_of(steps: int, stopped_by: str) -> TunedBudget:
    """The tuned budget of a run that took ``steps`` optimizer steps and stopped by ``stopped_by`` ("epoch": one epoch)."""
    return TunedBudget(0 if stopped_by == "epoch" else int(steps), int(steps))


def study_for(label: str, studies: tuple[str, ...]) -> Optional[str]:
    """The shipped tuning study that tunes ``label``: the methods' own, LLM-Neo's adapter variants'
    (neo+dora, ...), or none (lora+dora and the like are not searched)."""
    if "+" not in label:
        return studies[0]
    return studies[1] if label.startswith("neo+") else None


def tuned_lr_scales_by_budget(
    runs_dir: str, storage: Optional[str] = None, study_names: tuple[str, ...] = TUNING_STUDIES,
) -> dict[TunedBudget, dict[str, float]]:
    """Per tuned budget: label (as in the leaderboard: sft, lora, kd, neo, neo+dora, ...) -> the lr_scale chosen there.

    The studies in ``study_names`` that the storage holds are read together (at least one must be there),
    grouped by the budget their trials trained at."""
    import optuna
    from optuna.trial import TrialState

    url = storage or default_storage(runs_dir)
    hint = f"run `neobench ablate {study_names[0]} --runs-dir {runs_dir}` first"
    needs = f"the tuned protocol needs the {study_names[0]!r} study" + (
        f" (and {study_names[1]!r} for adapter variants)" if len(study_names) > 1 else "")
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise NoTuningStudy(f"{needs}, and {url} does not exist; {hint}")
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
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        budget = TunedBudget(base.max_steps, base.max_steps or trial_steps(runs_dir, finished))
        for t in finished:
            cfg = apply_overrides(base, {k: v for k, v in t.params.items()}, f"trial {t.number}")
            rows.append((budget, label_of(cfg.method, cfg.effective_variant(), None), cfg.lr_scale, float(t.value)))
    if not directions:
        raise NoTuningStudy(f"{needs}, which {url} does not hold; {hint}")
    if len(directions) > 1:
        raise NeobenchError(f"the tuning studies in {url} disagree on the direction of their objective; they cannot choose together")
    if not rows:
        raise NeobenchError(f"no tuning study in {url} has a finished trial yet; {hint}")
    return choices_by_budget(rows, minimize=directions == {optuna.study.StudyDirection.MINIMIZE})


def trial_steps(runs_dir: str, trials: list) -> int:
    """Optimizer steps the trials' runs took (what one epoch came to), from a finished trial's run; 0 if none is readable."""
    for t in trials:
        for run_id in t.user_attrs.get("run_ids", []):
            try:
                return int(json.loads((Path(runs_dir) / run_id / "metrics.json").read_text())["budget"]["steps"])
            except (OSError, ValueError, KeyError):
                continue
    return 0


def tuned_lr_scales(runs_dir: str, storage: Optional[str] = None, study_names: tuple[str, ...] = TUNING_STUDIES) -> dict[str, float]:
    """label -> the lr_scale the studies chose at the smallest tuned budget."""
    by_budget = tuned_lr_scales_by_budget(runs_dir, storage, study_names)
    return by_budget[min(by_budget, key=TunedBudget.order)]


TUNING_OBJECTIVE = ("neo_heldout_nll", "nll")
"""The (task, metric) every tuning study minimises: held-out NLL on the validation split."""


def tuning_trials(rows: "pd.DataFrame") -> "pd.DataFrame":
    """The tuning studies' trial rows of their objective (validation NLL), one per trial, out of tidy result rows."""
    students = rows[(rows["model"] == "student") & rows["study"].isin(TUNING_STUDIES)]
    task, metric = TUNING_OBJECTIVE
    return students[(students["task"] == task) & (students["metric"] == metric)]


def tuned_choices(trials: "pd.DataFrame") -> dict[TunedBudget, dict[str, float]]:
    """The choice of ``tuning_trials`` rows (with a ``label`` column) per budget they trained at, smallest first;
    empty where nothing is chosen yet. The rule the studies' storage is read with: choices_by_budget."""
    budgets = [budget_of(s, b) for s, b in zip(trials["steps"], trials["stopped_by"])]
    return choices_by_budget(list(zip(budgets, trials["label"], trials["lr_scale"], trials["value"])), minimize=True)


def committed_tuning(preset: str, leaderboards: Path = Path("leaderboards")) -> tuple[Path, dict[TunedBudget, dict[str, float]]]:
    """The choices of the tuning trials that the committed ``leaderboards/<preset>/results.jsonl`` holds, per budget
    (empty if none): the tuned protocol's rates on a machine whose runs directory holds no tuning study, such as a
    fresh clone. The report's own rule (tuning_trials, tuned_choices), so the rates its tuning table shows."""
    from neobench.runs.results import read_rows

    path = leaderboards / preset / "results.jsonl"
    if not path.is_file():
        return path, {}
    trials = tuning_trials(read_rows(path))
    labels = [label_of(m, v, l) for m, v, l in zip(trials["method"], trials["variant"], trials["loss"])]
    return path, tuned_choices(trials.assign(label=labels))


def tuned_configs(cfgs: list, given: dict, leaderboards: Path = Path("leaderboards")) -> list:
    """The planned runs, each at the lr_scale its tuning study chose (tune-lr; tune-lr-variants for LLM-Neo's variants),
    at the tuned budget nearest the run's own (tune-lr-epoch tunes one epoch). Where the runs directory's storage holds
    no tuning study, the committed leaderboard's tuning trials choose (committed_tuning), and a line says so."""
    if "lr_scale" in given:
        raise NeobenchError("--protocol tuned sets each method's --lr-scale from the tune-lr study; leave --lr-scale out")
    try:
        by_budget = tuned_lr_scales_by_budget(cfgs[0].runs_dir)
    except NoTuningStudy as no_study:
        path, by_budget = committed_tuning(cfgs[0].preset, leaderboards)
        if not by_budget:
            raise no_study
        console.print(f"tuned protocol: {cfgs[0].runs_dir}/ holds no tuning study; the rates are the ones that "
                      f"the tuning trials in {path} chose", highlight=False)
    tuned, said = [], set()
    for cfg in cfgs:
        label = label_of(cfg.method, cfg.effective_variant(), None)
        tuned_here = [b for b, choice in by_budget.items() if label in choice]  # the budgets that tuned this label
        if not tuned_here:
            study = study_for(label, TUNING_STUDIES)
            how = (f"run `neobench ablate {study}` to finish it" if study else
                   "no shipped study searches it: copy ablations/tune-lr-variants.yaml with its method, and run that")
            chosen = sorted({l for choice in by_budget.values() for l in choice})
            raise NeobenchError(
                f"no tuning study has finished its search for {label} (they have chosen for: "
                f"{', '.join(chosen) or 'none yet'}); {how}"
            )
        budget = nearest_tuned(cfg.max_steps, cfg.max_steps, tuned_here)
        scales = by_budget[budget]
        if scales[label] != 1.0:  # at 1 the tuned run is the paper protocol's run: not trained twice
            tuned.append(dataclasses.replace(cfg, lr_scale=scales[label]))
        if (label, budget) not in said:
            said.add((label, budget))
            same = " = the paper protocol's rate: its paper runs serve both protocols (`neobench run` trains them)"
            where = f" (tuned at {budget.name})" if len(by_budget) > 1 else ""
            console.print(f"tuned protocol: {label} at lr_scale {scales[label]:g}{where}{same if scales[label] == 1.0 else ''}",
                          highlight=False)
    return tuned
