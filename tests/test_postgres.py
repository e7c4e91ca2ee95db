"""Ablations on a real PostgreSQL server: several workers, exactly N trials, a killed worker's trial retried.

Run by `make test-postgres`, which starts a throwaway cluster (tests/postgres/with_cluster.sh) and
sets NEOBENCH_TEST_POSTGRES to its URL; `.ci/run` runs it after `make test`. Without that URL these
tests are skipped, saying so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc), deepest last."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            kids = [int(k) for k in open(f"/proc/{parent}/task/{parent}/children").read().split()]
        except OSError:
            kids = []
        found += kids
        frontier += kids
    return found


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
    proc = subprocess.Popen(
        [sys.executable, "-m", "neobench.cli", "ablate", str(study), "--workers", "2", "--storage", postgres_url, "--no-report"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    killed = None
    try:
        # kill -9 one worker and its trial process, as a lost machine would, while that trial trains.
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and killed is None:
            running = [t for t in trials_of(postgres_url, name) if t.state.name == "RUNNING"] if runs.is_dir() else []
            training = [p for p in runs.glob(".tmp-*/train_log.jsonl") if p.stat().st_size] if runs.is_dir() else []
            if running and training:
                victim = running[0]
                pid = int(victim.user_attrs["worker"].rpartition(":")[2])
                for p in [pid, *children(pid)]:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed = victim
            time.sleep(0.2)
        assert killed is not None, "no trial was seen training"
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

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
