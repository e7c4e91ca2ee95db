"""Ablations with Optuna: a study file in ablations/ -> trials (ordinary runs) -> tables and plots.

    StudySpec       ablations/<name>.yaml, checked field by field (a bad file fails in one line naming the field)
    run_study       create or load the study on its storage (SQLite beside the runs by default), then
                    run K workers until N trials are finished
    work            one worker: ask a trial, train + evaluate it in a child `neobench run`, tell the value
    TrialReporter   in that child: held-out NLL every few steps -> trial.report -> the pruner may stop it
    (neobench.ablation_report turns a finished study into <study>.md and PNG plots)

Every trial is an ordinary run directory whose config carries ``study`` and ``trial``, so
`neobench report` collects it (the main tables leave trials out and point here).

Exactly N trials: a worker starts a trial only while fewer than N are finished or running, and a
trial asked in the same instant as another that fills the budget is told FAIL as "surplus"
before it trains. A trial whose worker died (killed, machine lost) is failed and re-queued with
the same parameters: at once when the worker ran on this host and its process is gone, else by
Optuna's heartbeat after ``GRACE_SECONDS``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from neobench.config import FIELD_NAMES, RunConfig, apply_overrides, load_preset, validate
from neobench.errors import DIVERGED_EXIT, NeobenchError
from neobench.progress import console
from neobench.protocols import TUNING_STUDIES, best_lr_scales
from neobench.registry import Registry

REPO_STUDIES = Path(__file__).resolve().parent.parent / "ablations"
STORAGE_FILE = "ablations.db"
PRUNED_EXIT = 3
HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 300
MAX_FAILURES_IN_A_ROW = 3
MAX_RETRIES = 3
SET_BY_ABLATE = ("study", "trial", "seed", "preset", "runs_dir")
SELECTION_SPLIT = "validation"
"""Trials are scored on this part of the held-out data; the leaderboard's part ("test") stays unseen."""
NEVER_SELECT_ON = ("test", "heldout")
"""Splits a study may not score: test, or the whole held-out file that contains it."""
BUDGET_KEYS = ("max_steps", "batch_size", "grad_accum", "seq_len", "max_examples", "max_wall_seconds")
SPEC_KEYS = ("description", "preset", "objective", "space", "sampler", "seed", "trials", "seeds", "budget",
             "fixed", "pruner", "intermediate")


class SurplusTrial(Exception):
    """This trial was asked while another filled the study's last slot; it is dropped before training."""


class TrialFailed(NeobenchError):
    pass


class TrialDiverged(NeobenchError):
    """The trial's run diverged (exit DIVERGED_EXIT): FAIL with the reason, never retried."""


# --- the study file --------------------------------------------------------------------------


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
        text = f"{self.name} in [{fmt(self.low)}, {fmt(self.high)}]" + (" (log)" if self.log else "")
        return text + (f", grid {', '.join(fmt(g) for g in self.grid)}" if self.grid else "")


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


def fmt(x: Any) -> str:
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
    from neobench.evaluation import TASKS, parse_task_list

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
    from neobench.config import PRESETS

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
        raise bad(f"{field}.high", f"must be above low ({fmt(low)}), got {fmt(high)}")
    if log and low <= 0:
        raise bad(f"{field}.low", f"must be positive on a log scale, got {fmt(low)}")
    step = raw.get("step")
    if step is not None and (not isinstance(step, (int, float)) or step <= 0 or log):
        raise bad(f"{field}.step", "must be a positive number, and cannot be combined with log")
    grid = raw.get("grid") or []
    if not isinstance(grid, list):
        raise bad(f"{field}.grid", f"must be a list of points, got {grid!r}")
    points = []
    for g in grid:
        if not isinstance(g, (int, float)) or isinstance(g, bool) or not low <= g <= high or (number is int and not float(g).is_integer()):
            raise bad(f"{field}.grid", f"has {g!r}, which is not a{'n integer' if number is int else ' number'} in [{fmt(low)}, {fmt(high)}]")
        points.append(number(g))
    return Param(name, raw["type"], low=low, high=high, log=log, step=step, grid=tuple(points))


def _checked(base: RunConfig, name: str, value: Any, field: str, bad) -> None:
    """A value the search may pick must make a valid run config (rank >= 1, kd_ratio in [0, 1], ...)."""
    try:
        validate(apply_overrides(base, {name: value}, field))
    except NeobenchError as err:
        raise bad(field, f"holds {value!r}, which is not a valid {name}: {err}") from None


# --- samplers, pruners, storage ------------------------------------------------------------


# Each sampler takes the spec and a seed: the spec's seed for the first worker, another for each
# further worker, which would otherwise propose exactly what the first one does.
def _grid(spec: StudySpec, seed: int):
    import optuna

    return optuna.samplers.GridSampler({p.name: p.grid_points() for p in spec.space}, seed=seed)


def _tpe(spec: StudySpec, seed: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, spec.trials))


def _random(spec: StudySpec, seed: int):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


SAMPLERS: Registry = Registry("sampler")
SAMPLERS.add("tpe", _tpe)
SAMPLERS.add("random", _random)
SAMPLERS.add("grid", _grid)


def _median(spec: StudySpec):
    import optuna

    return optuna.pruners.MedianPruner(
        n_startup_trials=spec.pruner_startup_trials, n_warmup_steps=spec.pruner_warmup_steps, interval_steps=1
    )


def _no_pruner(spec: StudySpec):
    import optuna

    return optuna.pruners.NopPruner()


PRUNERS: Registry = Registry("pruner")
PRUNERS.add("none", _no_pruner)
PRUNERS.add("median", _median)


def quiet_optuna() -> None:
    """Optuna logs every trial and warns that heartbeats and its matplotlib plots are experimental;
    neobench prints its own line per trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def default_storage(runs_dir: str) -> str:
    return f"sqlite:///{Path(runs_dir).resolve() / STORAGE_FILE}"


def open_storage(url: str):
    """Optuna RDB storage with heartbeats, so a trial whose worker vanished is failed and retried."""
    import optuna

    quiet_optuna()
    engine_kwargs: dict = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Workers and their trial processes write at once; wait for SQLite's lock instead of failing.
        engine_kwargs = {"connect_args": {"timeout": 120}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeat options are marked experimental
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRIES),
            )
        except Exception as err:  # sqlalchemy raises many types for a bad URL or an unreachable server
            hint = ""
            if isinstance(err, ImportError):
                hint = "; PostgreSQL needs `pip install 'psycopg[binary]'`, MySQL `pip install pymysql`"
            elif "parse" in str(err):
                hint = "; give an Optuna storage URL such as sqlite:///path/study.db or postgresql://user@host/db"
            raise NeobenchError(f"cannot open study storage {url!r}: {type(err).__name__}: {str(err).splitlines()[0]}{hint}") from None


def objective_direction(spec: StudySpec, cfg: RunConfig, student_path: str) -> str:
    """minimize or maximize, from the task's higher_is_better as lm-eval (or neo_fidelity) declares it."""
    from neobench.evaluation import FIDELITY, FIDELITY_HIGHER_IS_BETTER, EvalSpec, load_tasks

    task, metric = spec.objective_task, spec.objective_metric
    if task == FIDELITY:
        better = FIDELITY_HIGHER_IS_BETTER
    else:
        taskset = load_tasks(dataclasses.replace(EvalSpec.from_config(cfg), tasks=(task,)), student_path)
        loaded = taskset.manager.load([task])["tasks"]
        if task not in loaded:
            raise NeobenchError(f"study {spec.source!r}: field 'objective' names {task!r}, a group; name one of its tasks: {', '.join(loaded)}")
        better = loaded[task].higher_is_better()
    if metric not in better:
        raise NeobenchError(f"study {spec.source!r}: field 'objective' names metric {metric!r}, which {task} does not report; it reports {', '.join(better)}")
    return "maximize" if better[metric] else "minimize"


# --- running a study ---------------------------------------------------------------------------


DIVERGED_ATTR = "diverged"
"""User attribute of a trial whose run diverged: the one-line reason. Such a trial is FAIL, counts
toward the study's trials and is never queued again (its parameters would diverge again)."""


def diverged(trial) -> bool:
    return DIVERGED_ATTR in trial.user_attrs


def counted(study) -> int:
    """Trials that use up the budget: finished (complete, pruned or diverged) or running."""
    from optuna.trial import TrialState

    live = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    return len(live) + sum(diverged(t) for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def reap_dead_trials(study, storage) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker ran on this host and is gone (killed, crashed)."""
    from optuna.trial import TrialState

    host, reaped = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        worker_host, _, pid = worker.rpartition(":")
        if worker_host != host or not pid.isdigit() or _process_alive(int(pid)):
            continue
        try:
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except Exception:  # another worker reaped it first
            continue
        requeue(study, storage.get_trial(t._trial_id))
        reaped.append(t.number)
    return reaped


def requeue(study, frozen) -> None:
    """Queue a failed trial again with the same parameters (Optuna's retry, at most MAX_RETRIES times)."""
    import optuna

    optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRIES)(study, frozen)


def create_study(spec: StudySpec, study_name: str, storage_url: str, direction: str, command: str):
    """Create the study, or load it to continue; refuse to continue one made from another spec."""
    import optuna

    storage = open_storage(storage_url)
    study = optuna.create_study(
        study_name=study_name, storage=storage, sampler=SAMPLERS.get(spec.sampler)(spec, spec.seed),
        pruner=PRUNERS.get(spec.pruner)(spec), direction=direction, load_if_exists=True,
    )
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        for key, value in {"spec": spec.name, "preset": spec.preset, "objective": spec.objective, "direction": direction,
                           "fingerprint": spec.fingerprint(), "command": command, "description": spec.description,
                           "sampler": spec.sampler, "pruner": spec.pruner, "seeds": spec.seeds,
                           "budget": dict(spec.budget), "fixed": dict(spec.fixed),
                           "space": [p.describe() for p in spec.space]}.items():
            study.set_user_attr(key, value)
    elif json.loads(json.dumps(stored)) != json.loads(json.dumps(spec.fingerprint())):
        stored_fixed = dict(stored.get("fixed", []))
        was, asked = stored_fixed.get("dtype", "auto"), dict(spec.fixed).get("dtype", "auto")
        if was != asked:
            same = f"--dtype {was}" if "dtype" in stored_fixed else "no --dtype"
            raise NeobenchError(
                f"study {study_name!r} in {storage_url} trains in dtype {was}, not {asked}; continue it with "
                f"{same}, or start a {asked} one beside it with --study-name"
            )
        raise NeobenchError(
            f"study {study_name!r} in {storage_url} was made from a different version of {spec.source}; "
            f"continue it with the same file, or start a new one with --study-name"
        )
    elif study.direction.name.lower() != direction:
        raise NeobenchError(f"study {study_name!r} in {storage_url} maximizes/minimizes the other way; use --study-name")
    return study, storage


def load_study(spec: StudySpec, study_name: str, storage_url: str, worker_index: int = 0):
    import optuna

    storage = open_storage(storage_url)
    # Workers draw different random/TPE points, but a grid sampler's seed fixes which point each
    # grid id means (it shuffles the grid): every worker must share it, or ids collide across workers.
    seed = spec.seed if spec.sampler == "grid" else spec.seed + 1000 * worker_index
    sampler = SAMPLERS.get(spec.sampler)(spec, seed)
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler,
                              pruner=PRUNERS.get(spec.pruner)(spec))
    return study, storage


def grid_size(spec: StudySpec) -> Optional[int]:
    return math.prod(len(p.grid_points()) for p in spec.space) if spec.sampler == "grid" else None


def work(spec: StudySpec, study_name: str, storage_url: str, n_trials: int, runs_dir: str, worker_index: int = 0) -> None:
    """One worker: run trials until the study holds ``n_trials`` finished ones."""
    from neobench.experiment import run_in_child
    from neobench.labels import run_label
    from neobench.runs import new_run_id

    study, storage = load_study(spec, study_name, storage_url, worker_index)
    base = dataclasses.replace(spec.base_config(), runs_dir=runs_dir)
    me = f"{socket.gethostname()}:{os.getpid()}"
    current: dict[str, Any] = {}

    def objective(trial) -> float:
        import optuna

        trial.set_user_attr("worker", me)
        current["number"] = trial.number
        if _is_surplus(study, trial.number, n_trials):
            trial.set_user_attr("surplus", True)
            raise SurplusTrial()
        params = {p.name: p.suggest(trial) for p in spec.space}
        console.rule(f"[bold]{study_name} trial {trial.number}: {', '.join(f'{k}={fmt(v)}' for k, v in params.items())}")
        run_ids, values, stderrs = [], [], []
        for offset in range(spec.seeds):
            cfg = validate(dataclasses.replace(
                apply_overrides(base, params, f"trial {trial.number}"), seed=base.seed + offset,
                study=study_name, trial=trial.number,
            ))
            run_id = new_run_id(cfg)
            payload = {"storage": storage_url, "study": study_name, "spec": spec.source, "trial_id": trial._trial_id,
                       "report": offset == 0}
            resume = resumable_run(trial, runs_dir, offset)
            trial.set_user_attr(f"unfinished_run_{offset}", resume or run_id)
            if resume:
                console.print(f"trial {trial.number}: continuing {resume} from its checkpoint", highlight=False)
                code = run_in_child(cfg, resume, ("--resume", resume, "--runs-dir", runs_dir), resolved=False)
                run_id = resume
            else:
                code = run_in_child(cfg, run_id, ("--optuna-trial", json.dumps(payload)))
            if code == PRUNED_EXIT:
                raise optuna.TrialPruned()
            if code == DIVERGED_EXIT:
                reason = failure_reason(Path(runs_dir), run_id)
                trial.set_user_attr(DIVERGED_ATTR, reason)
                raise TrialDiverged(f"trial {trial.number} ({params}) failed: {reason}")
            if code != 0:
                raise TrialFailed(f"trial {trial.number} ({run_label(cfg)}, {params}) failed: its run exited with {code}")
            run_ids.append(run_id)
            trial.set_user_attr("run_ids", run_ids)
            found = read_objective(Path(runs_dir) / run_id, spec)
            values.append(found["value"])
            stderrs.append(found["stderr"])
            for key in ("teacher", "untrained", "train_seconds", "peak_memory_bytes", "trainable_params"):
                trial.set_user_attr(key, found[key])
        value = sum(values) / len(values)
        trial.set_user_attr("seed_values", values)
        if all(s is not None for s in stderrs):
            trial.set_user_attr("stderr", math.sqrt(sum(s * s for s in stderrs)) / len(stderrs))
        return value

    failures = 0
    while True:
        reaped = reap_dead_trials(study, storage)
        if reaped:
            console.print(f"re-queued trial(s) {', '.join(map(str, reaped))}: their worker process is gone", highlight=False)
        if counted(study) >= n_trials and not _waiting(study):
            return
        current.clear()
        try:
            study.optimize(objective, n_trials=1, catch=(), gc_after_trial=False)
        except SurplusTrial:
            return
        except TrialDiverged as err:  # FAIL, with its reason; not queued again
            console.print(f"[red]{err}; not retried[/red]", highlight=False)
            continue
        except TrialFailed as err:
            # Its run process died (killed, out of memory): queue the same parameters again (up to
            # 3 times); a setting that fails every time stops the worker after 3 failures in a row.
            failures += 1
            requeue(study, study.get_trials(deepcopy=False)[current["number"]])
            console.print(f"[red]{err}; queued again[/red]", highlight=False)
            if failures >= MAX_FAILURES_IN_A_ROW:
                raise NeobenchError(f"{failures} trials in a row failed; the last: {err}") from None
            continue
        except KeyboardInterrupt:
            if "number" in current:  # optuna marked it FAIL; queue it again so the study resumes with it
                requeue(study, study.get_trials(deepcopy=False)[current["number"]])
            raise
        failures = 0
        _print_progress(study, n_trials)


def resumable_run(trial, runs_dir: str, offset: int) -> Optional[str]:
    """The unfinished run (with a checkpoint) of the failed trial this one retries, if any.

    A retried trial (Optuna's RetryFailedTrialCallback) inherits the user attributes of the trial
    it repeats, among them the id of the run that trial was training; when that run was killed
    after writing a checkpoint (the study's runs use save_every), the retry continues it.
    """
    from neobench.checkpoint import latest

    run_id = trial.user_attrs.get(f"unfinished_run_{offset}")
    if run_id and latest(Path(runs_dir) / f".tmp-{run_id}") is not None:
        return run_id
    return None


def failure_reason(runs_dir: Path, run_id: str) -> str:
    from neobench.runs import FAILURE_FILE

    path = runs_dir / f".tmp-{run_id}" / FAILURE_FILE
    return json.loads(path.read_text())["message"] if path.is_file() else "its run diverged"


def _waiting(study) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _is_surplus(study, number: int, n_trials: int) -> bool:
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    return sum(1 for t in study.get_trials(deepcopy=False) if t.number < number and (t.state in live or diverged(t))) >= n_trials


def _print_progress(study, n_trials: int) -> None:
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    last = max(done, key=lambda t: t.datetime_complete)
    best = study.best_trial if any(t.state == TrialState.COMPLETE for t in done) else None
    what = f"{study.user_attrs.get('objective')} {last.value:.4f}" if last.state == TrialState.COMPLETE else "pruned"
    best_text = f"; best {best.value:.4f} (trial {best.number}: {best.params})" if best else ""
    console.print(f"[bold]trial {last.number}[/bold] {what}{best_text}; {len(done)}/{n_trials} done", highlight=False)


def read_objective(run_dir: Path, spec: StudySpec) -> dict:
    """The objective's value (and the reference models' values) from a finished trial's run directory."""
    found: dict[str, Any] = {"teacher": None, "untrained": None, "stderr": None}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    found.update(train_seconds=metrics["cost"]["train_seconds"], peak_memory_bytes=metrics["cost"]["peak_memory_bytes"],
                 trainable_params=metrics["cost"]["trainable_params"])
    roles = {"student": "value", "teacher": "teacher", "untrained_student": "untrained"}
    for path in sorted((run_dir / "evaluations").glob("*.json")):
        for evaluation in json.loads(path.read_text())["evaluations"]:
            for row in evaluation["rows"]:
                if (row["task"], row["metric"]) == (spec.objective_task, spec.objective_metric):
                    found[roles[evaluation["role"]]] = row["value"]
                    if evaluation["role"] == "student":
                        found["stderr"] = row.get("stderr")
    if "value" not in found:
        raise TrialFailed(f"run {run_dir.name} has no {spec.objective} score; was it evaluated on {spec.objective_task}?")
    return found


def run_study(
    spec: StudySpec, n_trials: Optional[int], storage_url: Optional[str], workers: int, study_name: Optional[str],
    runs_dir: Optional[str], command: str,
) -> tuple[Any, str]:
    """`neobench ablate`: prepare shared artefacts once, then run workers until N trials are finished."""
    import subprocess

    from neobench.train import prepare

    base = spec.base_config()
    runs_dir = runs_dir or base.runs_dir
    base = dataclasses.replace(base, runs_dir=runs_dir)
    storage_url = storage_url or default_storage(runs_dir)
    study_name = study_name or spec.name
    n_trials = n_trials or spec.trials
    open_storage(storage_url)  # a bad URL fails now, not after the models are prepared
    size = grid_size(spec)
    if size is not None and n_trials > size:
        console.print(f"the grid has {size} points; running {size} trials, not {n_trials}", highlight=False)
        n_trials = size
    # Dequantize/prune once and check the objective's task before any worker starts.
    from neobench.evaluation import FIDELITY, EvalSpec
    from neobench.methods import METHODS

    eval_spec = EvalSpec.from_config(base)
    ws = prepare(base, need_teacher=METHODS.get(base.method).uses_teacher or FIDELITY in eval_spec.tasks)
    direction = objective_direction(spec, base, ws.student_path)
    study, storage = create_study(spec, study_name, storage_url, direction, command)
    before = counted(study)
    console.print(
        f"study [bold]{study_name}[/bold] ({spec.source}): {direction} {spec.objective}; {spec.sampler} sampler, "
        f"{spec.pruner} pruner; {before} of {n_trials} trials already there; storage {storage_url}", highlight=False,
    )
    if workers <= 1:
        work(spec, study_name, storage_url, n_trials, runs_dir)
    else:
        cmd = [sys.executable, "-m", "neobench.cli", "ablate", spec.source, "--trials", str(n_trials),
               "--storage", storage_url, "--study-name", study_name, "--runs-dir", runs_dir]
        dtype = dict(spec.fixed).get("dtype")
        if dtype is not None:  # from the file or --dtype: passing it again is the same study
            cmd += ["--dtype", str(dtype)]
        children = [subprocess.Popen([*cmd, "--worker", str(i + 1)]) for i in range(workers)]
        try:
            codes = [c.wait() for c in children]
        except KeyboardInterrupt:
            for c in children:
                try:
                    c.wait(timeout=90)  # each worker got the SIGINT too: let it re-queue its trial
                except subprocess.TimeoutExpired:
                    c.kill()
            raise
        if any(codes):
            raise NeobenchError(f"worker(s) exited with {codes}; `neobench ablate {spec.name}` again continues the study")
    return study, storage_url


def trial_reporter(payload: dict):
    """In a trial's `neobench run` process: report held-out NLL every few steps; stop if pruned.

    The value is signed to the study's direction (NLL for a minimized objective, -NLL for a
    maximized one), so the pruner compares it as it compares the objective. Only a trial's first
    seed reports; its later seeds run to the end.
    """
    import optuna

    from neobench.evaluation import encode_pairs, heldout_nll
    from neobench.suite import heldout_pairs

    spec = load_spec(payload["spec"])
    if not payload.get("report") or spec.report_every == 0:
        return None
    study, _ = load_study(spec, payload["study"], payload["storage"])
    trial = optuna.trial.Trial(study, payload["trial_id"])
    sign = 1.0 if study.direction.name.lower() == "minimize" else -1.0
    examples: list = []

    def after_step(step: int, student, ws) -> None:
        if step % spec.report_every:
            return
        if not examples:
            cfg = spec.base_config()
            examples.extend(encode_pairs(ws.tokenizer, heldout_pairs(cfg.eval_data, cfg.eval_split)[: spec.report_prompts]))
        nll = heldout_nll(student, ws.tokenizer.pad_token_id, examples)
        trial.report(sign * nll, step)
        console.print(f"[dim]step {step}: held-out NLL {nll:.4f} on {len(examples)} prompts (reported)[/dim]", highlight=False)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} (held-out NLL {nll:.4f})")

    return after_step


# --- the tuned protocol -------------------------------------------------------------------------

def tuned_lr_scales(runs_dir: str, storage: Optional[str] = None, study_names: tuple[str, ...] = TUNING_STUDIES) -> dict[str, float]:
    """label (as in the leaderboard: sft, lora, kd, neo, neo+dora, ...) -> the lr_scale the studies chose.

    The studies in ``study_names`` that the storage holds are read together (at least one must be there)."""
    import optuna
    from optuna.trial import TrialState

    from neobench.labels import label_of

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
