"""The study file (ablations/<name>.yaml): its schema, checked field by field, as a StudySpec.

A bad file fails in one line that names the field. Every trial of a study is scored on the
``validation`` split; a study may never score the leaderboard's ``test`` split.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from neobench.ablation.samplers import PRUNERS, SAMPLERS
from neobench.core.errors import NeobenchError
from neobench.core.registry import Registry
from neobench.runs.config import FIELD_NAMES, RunConfig, apply_overrides, load_preset, validate

REPO_STUDIES = Path(__file__).resolve().parents[2] / "ablations"
SET_BY_ABLATE = ("study", "trial", "seed", "preset", "runs_dir")
SELECTION_SPLIT = "validation"
"""Trials are scored on this part of the held-out data; the leaderboard's part ("test") stays unseen."""
NEVER_SELECT_ON = ("test", "heldout")
"""Splits a study may not score: test, or the whole held-out file that contains it."""
BUDGET_KEYS = ("max_steps", "batch_size", "grad_accum", "seq_len", "max_examples", "max_wall_seconds")
SPEC_KEYS = ("description", "preset", "objective", "space", "sampler", "seed", "trials", "seeds", "budget",
             "fixed", "pruner", "intermediate")


@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a RunConfig field and its range or choices."""

    name: str
    kind: str  # int, float or categorical
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: tuple = ()
    grid: tuple = ()
    """Points a grid sampler visits (for categorical: the choices)."""

    def suggest(self, trial) -> Any:
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def grid_points(self) -> list:
        return list(self.choices) if self.kind == "categorical" else list(self.grid)

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name} in {{{', '.join(map(str, self.choices))}}}"
        text = f"{self.name} in [{fmt_value(self.low)}, {fmt_value(self.high)}]" + (" (log)" if self.log else "")
        return text + (f", grid {', '.join(fmt_value(g) for g in self.grid)}" if self.grid else "")


@dataclass(frozen=True)
class StudySpec:
    name: str
    description: str
    preset: str
    objective_task: str
    objective_metric: str
    space: tuple[Param, ...]
    sampler: str = "tpe"
    seed: int = 0
    """Seed of the sampler (and the base seed of every trial's runs)."""
    trials: int = 8
    """Trials run when --trials is not given."""
    seeds: int = 1
    """Runs per trial (seeds seed, seed+1, ...); the objective is their mean."""
    budget: tuple[tuple[str, Any], ...] = ()
    fixed: tuple[tuple[str, Any], ...] = ()
    pruner: str = "none"
    pruner_startup_trials: int = 2
    pruner_warmup_steps: int = 4
    report_every: int = 4
    """Steps between intermediate held-out NLL reports (0: none)."""
    report_prompts: int = 16
    """Held-out prompts scored at each report."""
    source: str = ""

    @property
    def objective(self) -> str:
        return f"{self.objective_task}/{self.objective_metric}"

    def base_config(self) -> RunConfig:
        cfg = load_preset(self.preset)
        overrides = {**dict(self.budget), "eval_split": SELECTION_SPLIT, **dict(self.fixed)}
        return validate(apply_overrides(cfg, overrides, f"study {self.source!r}"))

    def fingerprint(self) -> dict:
        """What makes two studies the same experiment (not the description or trial count)."""
        return {
            "preset": self.preset, "objective": self.objective, "space": [dataclasses.asdict(p) for p in self.space],
            "sampler": self.sampler, "seed": self.seed, "seeds": self.seeds, "budget": list(self.budget),
            "fixed": list(self.fixed), "pruner": self.pruner, "eval_split": self.base_config().eval_split,
        }


def fmt_value(x: Any) -> str:
    """A parameter value as tables and messages show it: a float in %g form (3.16, 1e-05), anything else as str."""
    return f"{x:g}" if isinstance(x, float) else str(x)


def study_files() -> Registry[Path]:
    """Study name -> file: ablations/ in the working directory, then the repository's."""
    found: Registry[Path] = Registry("study")
    for folder in (Path.cwd() / "ablations", REPO_STUDIES):  # the working directory as it is now
        for path in sorted(folder.glob("*.yaml")):
            if path.stem not in found:
                found.add(path.stem, path)
    return found


def load_spec(name_or_path: str) -> StudySpec:
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = study_files().get(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise NeobenchError(f"study {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_spec(data, path.stem, str(path))


def parse_spec(data: Any, name: str, source: str) -> StudySpec:
    """Check a study file's fields; the first problem is raised in one line that names the field."""
    from neobench.evaluation.catalog import TASKS, parse_task_list

    def bad(field: str, problem: str) -> NeobenchError:
        return NeobenchError(f"study {source!r}: field {field!r} {problem}")

    if not isinstance(data, dict):
        raise NeobenchError(f"study {source!r} must be a mapping with keys {', '.join(SPEC_KEYS)}")
    for key in data:
        if key not in SPEC_KEYS:
            raise bad(key, f"is not a study key; valid keys: {', '.join(SPEC_KEYS)}")
    for key in ("preset", "objective", "space"):
        if key not in data:
            raise bad(key, "is missing")

    def integer(key: str, default: int, least: int) -> int:
        value = data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise bad(key, f"must be an integer >= {least}, got {value!r}")
        return value

    def mapping(key: str) -> dict:
        value = data.get(key) or {}
        if not isinstance(value, dict):
            raise bad(key, f"must be a mapping of config keys to values, got {value!r}")
        for k in value:
            if k not in FIELD_NAMES:
                raise bad(f"{key}.{k}", f"is not a config key; valid keys: {', '.join(FIELD_NAMES)}")
        return value

    budget, fixed = mapping("budget"), mapping("fixed")
    for k in budget:
        if k not in BUDGET_KEYS:
            raise bad(f"budget.{k}", f"is not a budget key ({', '.join(BUDGET_KEYS)}); put it under 'fixed'")
    for k in fixed:
        if k in BUDGET_KEYS:
            raise bad(f"fixed.{k}", "is a budget key; put it under 'budget'")
        if k in SET_BY_ABLATE:
            raise bad(f"fixed.{k}", "is set by `neobench ablate` itself")
    if fixed.get("eval_split", SELECTION_SPLIT) in NEVER_SELECT_ON:
        raise bad("fixed.eval_split", f"may not be {fixed['eval_split']!r}: a study selects a configuration, so it scores "
                  f"the {SELECTION_SPLIT!r} split and never the leaderboard's 'test' split")
    from neobench.runs.config import PRESETS

    preset = data["preset"]
    if not isinstance(preset, str) or not (preset in PRESETS or Path(preset).is_file()):
        raise bad("preset", f"must name a preset ({', '.join(PRESETS)}) or a preset file, got {preset!r}")
    try:
        base = validate(apply_overrides(load_preset(preset), {**budget, "eval_split": SELECTION_SPLIT, **fixed}, "budget/fixed"))
    except NeobenchError as err:
        raise NeobenchError(f"study {source!r}: {err}") from None

    objective = data["objective"]
    if not isinstance(objective, str) or objective.count("/") != 1:
        raise bad("objective", f"must be TASK/METRIC, e.g. neo_heldout_nll/nll, got {objective!r}")
    task, metric = objective.split("/")
    if task in TASKS and metric not in TASKS.get(task).metrics:
        raise bad("objective", f"names metric {metric!r}, which {task} does not report; it reports {', '.join(TASKS.get(task).metrics)}")
    if task not in parse_task_list(base.eval_tasks):
        raise bad("objective", f"names task {task!r}, which the trials do not evaluate (eval_tasks: {base.eval_tasks})")

    space = data["space"]
    if not isinstance(space, dict) or not space:
        raise bad("space", "must map config keys to ranges, e.g. rank: {type: int, low: 8, high: 256, log: true}")
    params = tuple(_parse_param(name_, value, base, bad) for name_, value in space.items())
    for p in params:
        if p.name in budget or p.name in fixed:
            raise bad(f"space.{p.name}", "is also held fixed under 'budget' or 'fixed'; keep it in one place")

    sampler = data.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise bad("sampler", f"must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler == "grid":
        for p in params:
            if not p.grid_points():
                raise bad(f"space.{p.name}.grid", "is needed by the grid sampler: list the points to visit")

    pruner = data.get("pruner", "none")
    pruner_opts: dict = {}
    if isinstance(pruner, dict):
        pruner_opts = dict(pruner)
        pruner = pruner_opts.pop("type", None)
        for k in pruner_opts:
            if k not in ("startup_trials", "warmup_steps"):
                raise bad(f"pruner.{k}", "is not a pruner key; valid keys: type, startup_trials, warmup_steps")
    if pruner not in PRUNERS:
        raise bad("pruner", f"must be one of {', '.join(PRUNERS)} (or a mapping with type:), got {pruner!r}")
    for k, v in pruner_opts.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise bad(f"pruner.{k}", f"must be an integer >= 0, got {v!r}")

    intermediate = data.get("intermediate") or {}
    if not isinstance(intermediate, dict) or set(intermediate) - {"every", "prompts"}:
        raise bad("intermediate", f"must be a mapping with keys every, prompts; got {intermediate!r}")
    every, prompts = intermediate.get("every", 4), intermediate.get("prompts", 16)
    for k, v, least in (("every", every, 0), ("prompts", prompts, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise bad(f"intermediate.{k}", f"must be an integer >= {least}, got {v!r}")
    if pruner != "none" and every == 0:
        raise bad("intermediate.every", f"is 0, so the {pruner} pruner would never see a value; report every few steps")

    description = data.get("description", "")
    if not isinstance(description, str):
        raise bad("description", f"must be text, got {description!r}")
    return StudySpec(
        name=name, description=description.strip(), preset=preset, objective_task=task, objective_metric=metric,
        space=params, sampler=sampler, seed=integer("seed", 0, 0), trials=integer("trials", 8, 1),
        seeds=integer("seeds", 1, 1), budget=tuple(budget.items()), fixed=tuple(fixed.items()), pruner=pruner,
        pruner_startup_trials=pruner_opts.get("startup_trials", 2), pruner_warmup_steps=pruner_opts.get("warmup_steps", 4),
        report_every=every, report_prompts=prompts, source=source,
    )


def with_dtype(spec: StudySpec, dtype: Optional[str]) -> StudySpec:
    """`neobench ablate --dtype`: every trial in this dtype, held fixed as if the study file said so.

    It joins ``fixed`` (and so the study's fingerprint): a study made in fp32 is not continued in bf16.
    Pinning it matters because ``auto`` follows the hardware, and a sweep whose points differ by
    hundredths of a nat should not change its numbers with the machine it runs on.
    """
    if dtype is None:
        return spec
    if any(p.name == "dtype" for p in spec.space):
        raise NeobenchError(f"--dtype: study {spec.name!r} searches over dtype; drop --dtype or the dtype parameter")
    fixed = tuple((k, v) for k, v in spec.fixed if k != "dtype") + (("dtype", dtype),)
    pinned = dataclasses.replace(spec, fixed=fixed)
    pinned.base_config()  # an unknown dtype fails here, in one line
    return pinned


def _parse_param(name: str, raw: Any, base: RunConfig, bad) -> Param:
    field = f"space.{name}"
    if name not in FIELD_NAMES:
        raise bad(field, f"is not a config key; valid keys: {', '.join(FIELD_NAMES)}")
    if name in SET_BY_ABLATE:
        raise bad(field, "is set by `neobench ablate` itself and cannot be searched")
    if not isinstance(raw, dict) or raw.get("type") not in ("int", "float", "categorical"):
        raise bad(f"{field}.type", "must be int, float or categorical")
    allowed = {"type", "choices"} if raw["type"] == "categorical" else {"type", "low", "high", "log", "step", "grid"}
    for k in raw:
        if k not in allowed:
            raise bad(f"{field}.{k}", f"is not a key of a {raw['type']} parameter; valid keys: {', '.join(sorted(allowed))}")

    if raw["type"] == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise bad(f"{field}.choices", "must list at least two values")
        for c in choices:
            _checked(base, name, c, f"{field}.choices", bad)
        return Param(name, "categorical", choices=tuple(choices))
    number = int if raw["type"] == "int" else float
    values = {}
    for k in ("low", "high"):
        v = raw.get(k)
        if isinstance(v, str):
            try:
                v = float(v)  # YAML reads 1e-4 (no dot) as text
            except ValueError:
                pass
        if not isinstance(v, (int, float)) or isinstance(v, bool) or (number is int and not float(v).is_integer()):
            raise bad(f"{field}.{k}", f"must be a{'n integer' if number is int else ' number'}, got {raw.get(k)!r}")
        values[k] = number(v)
        _checked(base, name, values[k], f"{field}.{k}", bad)
    low, high, log = values["low"], values["high"], bool(raw.get("log", False))
    if not low < high:
        raise bad(f"{field}.high", f"must be above low ({fmt_value(low)}), got {fmt_value(high)}")
    if log and low <= 0:
        raise bad(f"{field}.low", f"must be positive on a log scale, got {fmt_value(low)}")
    step = raw.get("step")
    if step is not None and (not isinstance(step, (int, float)) or step <= 0 or log):
        raise bad(f"{field}.step", "must be a positive number, and cannot be combined with log")
    grid = raw.get("grid") or []
    if not isinstance(grid, list):
        raise bad(f"{field}.grid", f"must be a list of points, got {grid!r}")
    points = []
    for g in grid:
        if not isinstance(g, (int, float)) or isinstance(g, bool) or not low <= g <= high or (number is int and not float(g).is_integer()):
            raise bad(f"{field}.grid", f"has {g!r}, which is not a{'n integer' if number is int else ' number'} in [{fmt_value(low)}, {fmt_value(high)}]")
        points.append(number(g))
    return Param(name, raw["type"], low=low, high=high, log=log, step=step, grid=tuple(points))


def _checked(base: RunConfig, name: str, value: Any, field: str, bad) -> None:
    """A value the search may pick must make a valid run config (rank >= 1, kd_ratio in [0, 1], ...)."""
    try:
        validate(apply_overrides(base, {name: value}, field))
    except NeobenchError as err:
        raise bad(field, f"holds {value!r}, which is not a valid {name}: {err}") from None


def grid_size(spec: StudySpec) -> Optional[int]:
    return math.prod(len(p.grid_points()) for p in spec.space) if spec.sampler == "grid" else None
