"""Ablations on a real PostgreSQL server: several workers, exactly N trials, a killed worker's trial retried.

Run by `make test-postgres`, which starts a throwaway cluster (tests/postgres/with_cluster.sh) and
sets NEOBENCH_TEST_POSTGRES to its URL; `.ci/run` runs it after `make test`. Without that URL these
tests are skipped, saying so.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid

import pytest

from test_ablation import neobench, run_configs, tiny_preset, write_study  # noqa: F401 (tiny_preset: a fixture)

pytestmark = pytest.mark.postgres


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get("NEOBENCH_TEST_POSTGRES")
    if not url:
        pytest.skip("no PostgreSQL server: `make test-postgres` starts one and runs these tests")
    return url


def trials_of(url: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def test_four_workers_on_postgres_run_a_grid_exactly_once(tiny_preset, tmp_path, postgres_url):  # noqa: F811
    name = f"grid-{uuid.uuid4().hex[:8]}"
    study = write_study(tmp_path, name, tiny_preset, trials=4, budget={"max_steps": 2},
                        space={"rank": {"type": "int", "low": 2, "high": 16, "log": True, "grid": [2, 4, 8, 16]}})
    started = time.perf_counter()
    result = neobench("ablate", str(study), "--workers", "4", "--storage", postgres_url, "--no-report")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"4 workers, 4 trials on PostgreSQL: {time.perf_counter() - started:.0f} s")
    trials = trials_of(postgres_url, name)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4, [t.state.name for t in trials]
    assert all(t.state.name == "COMPLETE" or t.user_attrs.get("surplus") for t in trials), "none lost, none left running"
    assert sorted(t.params["rank"] for t in complete) == [2, 4, 8, 16], "every grid point once, none twice"
    assert len({t.user_attrs["worker"] for t in complete}) >= 2, "the workers shared the trials"
    configs = run_configs(tmp_path / "runs")
    assert sorted(c["trial"] for c in configs) == sorted(t.number for t in complete), "one run per trial"


def test_a_worker_killed_mid_trial_on_postgres_has_its_trial_run_again(tiny_preset, tmp_path, postgres_url):  # noqa: F811
    name = f"kill-{uuid.uuid4().hex[:8]}"
    study = write_study(tmp_path, name, tiny_preset, trials=3, budget={"max_steps": 24})
    runs = tmp_path / "runs"
    # kill -9 the worker of trial 0 and its trial process, as a lost machine would, right after that
    # trial's step 2 (injected there: no polling, no race with the trial's end). The other worker goes on.
    result = neobench("ablate", str(study), "--workers", "2", "--storage", postgres_url, "--no-report",
                      env={**os.environ, "NEOBENCH_INJECT_FAULT": "kill-worker-after-step:2:trial:0"})
    exited = re.search(r"worker\(s\) exited with \[(-?\d+), (-?\d+)\]", result.stderr)
    assert exited and sorted(map(int, exited.groups())) == [-signal.SIGKILL, 0], result.stderr[-3000:]
    (killed,) = [t for t in trials_of(postgres_url, name) if t.number == 0]

    # The surviving worker re-queues the dead worker's trial; if the study is not done yet (the
    # survivor finished first), running the command again completes it, as the README says.
    if sum(t.state.name == "COMPLETE" for t in trials_of(postgres_url, name)) < 3:
        again = neobench("ablate", str(study), "--storage", postgres_url, "--no-report")
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    trials = trials_of(postgres_url, name)
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 3 and "RUNNING" not in states, states
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retried and retried[0].state.name == "COMPLETE" and retried[0].params == killed.params
    assert sorted(t.params["rank"] for t in trials if t.state.name == "COMPLETE") == [2, 4, 8]
    assert len(run_configs(runs)) == 3, "the killed trial left no run behind; its retry did"
