"""A study on its Optuna storage: opening the storage, creating or continuing the study, and the
trial states that count toward its budget (finished, diverged, or re-queued when their worker died).

A trial whose worker died (killed, machine lost) is failed and re-queued with the same parameters:
at once when the worker ran on this host and its process is gone, else by Optuna's heartbeat after
``GRACE_SECONDS``.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path

from neobench.ablation.samplers import PRUNERS, SAMPLERS
from neobench.ablation.spec import StudySpec
from neobench.core.errors import NeobenchError

STORAGE_FILE = "ablations.db"
HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 300
MAX_RETRIES = 3


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
