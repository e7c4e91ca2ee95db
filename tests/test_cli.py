"""`neobench` as a user types it: run directories, the matrix, one-line errors."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from conftest import kill_tree
import yaml

from neobench.runs.execute import execute


def neobench(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "neobench.cli", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, cwd=cwd,
    )


def tiny_flags(tiny, runs_dir):
    return [
        "--teacher", str(tiny["teacher"]), "--student", str(tiny["student"]), "--train-data", str(tiny["data"]),
        "--seq-len", "64", "--batch-size", "4", "--max-steps", "2", "--rank", "4", "--runs-dir", str(runs_dir),
        "--tasks", "none", "--eval-data", str(tiny["data"]), "--eval-split", "train", "--limit", "6",
    ]


def test_run_without_method_trains_the_matrix_under_one_budget(tiny, tmp_path, cli):
    code, stderr = cli("run", *tiny_flags(tiny, tmp_path / "runs"))  # the parent here; each run in its own process
    assert code == 0, stderr[-2000:]
    runs = sorted((tmp_path / "runs").iterdir())
    assert not [r for r in runs if r.name.startswith(".")], "no temp directories may remain"
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    assert sorted((m["method"], m["variant"]) for m in metrics) == [("kd", None), ("lora", "lora"), ("neo", "lora"), ("sft", None)]
    budgets = {(m["budget"]["steps"], m["budget"]["tokens"], m["budget"]["data_hash"]) for m in metrics}
    assert len(budgets) == 1, "every method must consume the same budget"
    for run in runs:
        assert len((run / "train_log.jsonl").read_text().splitlines()) == 2
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["max_steps"] == 2 and config["rank"] == 4
    m = metrics[0]
    for key in ("wall_seconds", "versions"):
        assert key in m
    for key in ("train_seconds", "seconds_per_step", "tokens_per_second", "peak_memory_bytes", "trainable_params", "total_params"):
        assert m["cost"][key] > 0
    assert "neobench runs" in stderr  # the summary table


def test_variant_alone_runs_llm_neo():
    from neobench.runs.config import load_preset
    from neobench.runs.execute import plan

    (cfg,) = plan(load_preset("smol-cpu"), None, "rslora")
    assert (cfg.method, cfg.variant, cfg.loss) == ("neo", "rslora", "forward_kl")


@pytest.mark.parametrize("args,message", [
    (["--method", "distil"], "unknown method 'distil'; valid: sft, lora, kd, neo, minillm"),
    (["--variant", "qlora"], "unknown variant 'qlora'; valid: lora, dora, pissa, rslora, moslora"),
    (["--method", "sft", "--variant", "dora"], "--variant dora needs an adapter method"),
    (["--preset", "nope"], "unknown preset 'nope'; valid: paper-llama3.2, smol-cpu"),
    (["--kd-ratio", "2"], "config field 'kd_ratio' must be in [0, 1], got 2.0"),
    (["--train-data", "missing.jsonl"], "data file 'missing.jsonl' does not exist"),
    (["--student", "./nowhere"], "model path './nowhere' does not exist"),
    (["--limit", "0"], "config field 'eval_limit' must be at least 1, got 0"),
    (["--compile", "--nproc", "2"], "--compile runs in a single process"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stderr = cli("run", *args, "--runs-dir", str(tmp_path / "runs"))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert not (tmp_path / "runs").exists()


def test_a_run_that_dies_leaves_nothing_behind(tiny_cfg, monkeypatch):
    import neobench.training.loop

    def explode(*args, **kwargs):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(neobench.training.loop, "train", explode)
    with pytest.raises(RuntimeError):
        execute(dataclasses.replace(tiny_cfg, method="sft"))
    runs_dir = tiny_cfg.runs_dir
    assert not os.path.exists(runs_dir) or os.listdir(runs_dir) == []


def test_list_shows_every_registry(cli):
    code, stderr = cli("list")
    assert code == 0
    for name in ("sft", "lora", "kd", "neo", "dora", "pissa", "rslora", "moslora", "forward_kl", "smol-cpu", "paper-llama3.2",
                 "neo_heldout_nll", "neo_heldout_match", "neo_pydoc_bpb", "neo_fidelity", "neo_suite"):
        assert name in stderr


def test_shipped_data_matches_its_card():
    import hashlib

    from neobench.data.synth import packaged_dataset

    root = packaged_dataset()
    card = json.loads((root / "datacard.json").read_text())
    assert card["files"]["train.jsonl"]["rows"] >= 2000 and card["files"]["heldout.jsonl"]["rows"] >= 200
    for name, meta in card["files"].items():
        text = (root / name).read_text()
        assert hashlib.sha256(text.encode()).hexdigest() == meta["sha256"]
        assert len(text.splitlines()) == meta["rows"]
    train = {json.loads(l)["messages"][0]["content"] for l in (root / "train.jsonl").read_text().splitlines()}
    heldout = {json.loads(l)["messages"][0]["content"] for l in (root / "heldout.jsonl").read_text().splitlines()}
    assert not train & heldout, "held-out prompts must not appear in training"


# Each moment of a run where a stop signal can land, injected there (neobench.core.stopping.signal_point):
# (injection, extra flags, the line it must print, what the runs directory keeps).
STOP_MOMENTS = [
    ("sigint-at:setup", [], "stopped before step 1; the unfinished run was discarded (nothing trained yet)", "nothing"),
    ("sigint-at:before-step:1", [], "stopped before step 1; the unfinished run was discarded (nothing trained yet)", "nothing"),
    ("sigint-at:setup", ["--save-every", "2"], "stopped before step 1; the unfinished run was discarded (nothing trained yet)",
     "nothing"),
    ("sigint-at:inside-step:2", [], "stopped after step 2; the unfinished run was discarded (no --save-every)", "nothing"),
    ("sigterm-at:inside-step:2", [], "stopped after step 2; the unfinished run was discarded (no --save-every)", "nothing"),
    ("sigint-at:before-step:3", [], "stopped after step 2; the unfinished run was discarded (no --save-every)", "nothing"),
    ("sigint-at:inside-step:2", ["--save-every", "3"], "stopped after step 2; checkpoint in {tmp}/checkpoint/step-000002; "
     "continue with `neobench run --resume {id} --runs-dir {runs}`", "checkpoint"),
    ("sigterm-at:before-step:3", ["--save-every", "2"], "stopped after step 2; checkpoint in {tmp}/checkpoint/step-000002; "
     "continue with `neobench run --resume {id} --runs-dir {runs}`", "checkpoint"),
    ("sigint-at:final-write", ["--tasks", "neo_heldout_nll"], "stopped after training; the finished run is in {runs}/{id}, "
     "unscored: `neobench eval --run {runs}/{id}` scores it", "finished"),
    ("sigint-at:evaluation", ["--tasks", "neo_heldout_nll"], "stopped after training; the finished run is in {runs}/{id}, "
     "unscored: `neobench eval --run {runs}/{id}` scores it", "finished"),
    ("sigterm-at:final-write", [], "stopped after training; the finished run is in {runs}/{id} (--tasks none: nothing to score)",
     "finished"),
]


@pytest.mark.parametrize("fault,extra,line,kept", STOP_MOMENTS, ids=[f"{m[0]}{'+' + m[1][0][2:] if m[1] else ''}" for m in STOP_MOMENTS])
def test_a_stop_signal_at_any_moment_takes_the_one_stop_path(tiny, tmp_path, cli, monkeypatch, fault, extra, line, kept):
    """SIGINT/SIGTERM delivered at a named moment of the run (no sleep, no race): exit 130, the one
    line that says what was kept, and a runs directory holding that and nothing half-written. The
    runs directory's name is long: the line must still be one line in a log."""
    runs = tmp_path / ("a-runs-directory-with-a-long-name-" * 3) / "runs"
    flags = tiny_flags(tiny, runs)
    flags[flags.index("--max-steps") + 1] = "4"
    monkeypatch.setenv("NEOBENCH_INJECT_FAULT", fault)
    code, stderr = cli("run", "--method", "sft", *flags, *extra)
    assert code == 130, stderr[-2000:]
    left = sorted(runs.iterdir()) if runs.is_dir() else []
    if kept == "nothing":
        assert left == []
        run_id = ""
    else:
        (run,) = left
        run_id = run.name.removeprefix(".tmp-")
        if kept == "checkpoint":
            assert run.name.startswith(".tmp-") and (run / "checkpoint" / "latest").is_file()
            assert not (run / "metrics.json").exists()
        else:  # a finished run, renamed into place, with no (half-written) scores
            assert not run.name.startswith(".") and (run / "metrics.json").is_file() and (run / "trained_weights.safetensors").is_file()
            assert not list(run.glob("evaluations/*.json"))
    expected = line.format(runs=runs, id=run_id, tmp=runs / f".tmp-{run_id}")
    assert expected in stderr.splitlines(), stderr[-3000:]
    if kept == "checkpoint":  # the checkpoint the stop wrote is one to continue from
        monkeypatch.delenv("NEOBENCH_INJECT_FAULT")
        code, stderr = cli("run", "--resume", run_id, "--runs-dir", str(runs))
        assert code == 0, stderr[-2000:]
        metrics = json.loads((runs / run_id / "metrics.json").read_text())
        assert metrics["resumed_from_step"] == 2 and metrics["budget"]["steps"] == 4


def test_a_stopped_run_process_stops_the_matrix(tiny, tmp_path, cli, monkeypatch):
    """In a matrix each run has its own process: the first one is stopped in its step 1 (the signal
    injected there), says what it kept, and the parent starts no further run."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("NEOBENCH_INJECT_FAULT", "sigint-at:inside-step:1")
    code, stderr = cli("run", *tiny_flags(tiny, runs))
    assert code == 130, stderr[-2000:]
    lines = stderr.splitlines()
    assert "stopped after step 1; the unfinished run was discarded (no --save-every)" in lines, stderr[-2000:]
    assert "stopped at run 1/4; no run had finished" in lines
    assert "run 2/4" not in stderr
    assert list(runs.iterdir()) == []


def test_a_signal_to_the_parent_reaches_the_run_process_it_waits_for(tiny, tmp_path, watchdog):
    """A SIGTERM sent to `neobench run` alone (a process manager's stop) while a run process of its
    matrix trains: forwarded, that run stops after its step, and the matrix stops. The run process
    waits for the signal at a named point (wait-for-signal-at), so it is training when it comes."""
    import signal

    runs = tmp_path / "runs"
    flags = tiny_flags(tiny, runs)
    proc = subprocess.Popen([sys.executable, "-m", "neobench.cli", "run", "--method", "sft", "--seeds", "2", *flags],
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "NEOBENCH_INJECT_FAULT": "wait-for-signal-at:inside-step:1"})
    watchdog(proc)
    try:
        seen = []
        for line in proc.stderr:  # until the run process says it waits
            seen.append(line)
            if "waiting for a signal at inside-step:1\n" in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.communicate(timeout=300)[1]
    finally:  # never leave a run process behind (torchrun runs in a session of its own)
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
    lines = "".join(seen).splitlines() + rest.splitlines()
    assert proc.returncode == 130, "\n".join(lines[-30:])
    assert "stopped after step 1; the unfinished run was discarded (no --save-every)" in lines
    assert "stopped at run 1/2; no run had finished" in lines
    assert list(runs.iterdir()) == []


def test_a_second_signal_stops_at_once_and_every_signal_reaches_the_run_process(monkeypatch):
    """The handler records the first signal and forwards every signal to the run process it waits
    for; the same signal again within 2 s is one request (a terminal's Ctrl-C reaches both
    processes), a later one stops at once, and after that signals are ignored while the clean-up runs."""
    import signal

    from neobench.core import stopping

    class Child:
        def __init__(self):
            self.got = []

        def poll(self):
            return None

        def send_signal(self, signum):
            self.got.append(signum)

    clock = [100.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: clock[0])
    request, child = stopping.StopRequest(), Child()
    before = signal.getsignal(signal.SIGINT)
    with request.watching("training"), request.forwarding_to(child):
        assert signal.getsignal(signal.SIGINT) == request._handle
        assert not request.requested
        signal.raise_signal(signal.SIGTERM)
        assert request.received == signal.SIGTERM
        clock[0] += 1.5
        signal.raise_signal(signal.SIGINT)  # the same request, arriving twice
        clock[0] += 2.5
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        clock[0] += 5
        signal.raise_signal(signal.SIGINT)  # stopping at once already: ignored, still passed on
        assert child.got == [signal.SIGTERM, signal.SIGINT, signal.SIGINT, signal.SIGINT]
        with pytest.raises(KeyboardInterrupt), request.in_phase("evaluation"):  # a pending stop ends scoring at once
            pass
    assert signal.getsignal(signal.SIGINT) is before and not request.requested


def test_a_forked_child_dies_of_sigterm_as_its_parent_expects():
    """lm-eval's bootstrap forks a multiprocessing pool while a run is scored, and Pool.terminate()
    ends its workers with SIGTERM: a forked child gets the default handlers back at once, so even a
    child stuck in a lock (where no Python handler can run) dies of it."""
    import signal

    from neobench.core.stopping import StopRequest

    request = StopRequest()
    read_end, write_end = os.pipe()
    with request.watching("evaluation"):
        pid = os.fork()
        if pid == 0:  # the child: report its SIGTERM handler, then wait to be terminated
            import time

            os.write(write_end, b"default" if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else b"handled")
            time.sleep(30)
            os._exit(0)
        assert os.read(read_end, 16) == b"default"
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert not request.requested, "the child's signal is not the parent's stop"
    os.close(read_end)
    os.close(write_end)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_messages_stay_one_line_in_a_log_and_tables_keep_their_layout(capfd):
    """Outside a terminal a message is written whole, whatever its length; a table still fits 80 columns."""
    from rich.table import Table

    from neobench.core.progress import console

    path = "/tmp/" + "/".join(["a-directory-with-a-long-name"] * 6)
    console.print(f"interrupted; finished runs stay in {path}/ (24 truncated)")
    console.print(f"[dim]a dim message about {path}[/dim]", highlight=False)
    table = Table("column")
    table.add_row("word " * 40)
    console.print(table)
    lines = capfd.readouterr().err.splitlines()
    assert lines[0] == f"interrupted; finished runs stay in {path}/ (24 truncated)"
    assert lines[1] == f"a dim message about {path}"
    assert len(lines) > 5 and max(len(l) for l in lines[2:]) <= 80


def test_run_prints_scores_and_a_failed_evaluation_keeps_the_run(tiny, tmp_path, cli, monkeypatch):
    flags = tiny_flags(tiny, tmp_path / "runs")
    flags[flags.index("--tasks") + 1] = "neo_heldout_nll,neo_fidelity"
    code, stderr = cli("run", "--variant", "lora", *flags)
    assert code == 0, stderr[-2000:]
    assert "scores (± stderr)" in stderr and "untrained" in stderr and "teacher" in stderr
    (run,) = (tmp_path / "runs").iterdir()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert "trained_weights.safetensors" in {p.name for p in before}

    # A standard task whose data cannot be had: one line naming the data set, the run untouched.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    code, stderr = cli("eval", "--run", run.name, "--runs-dir", str(tmp_path / "runs"), "--tasks", "arc_easy")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: task 'arc_easy' needs the data set allenai/ai2_arc"), stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


@pytest.mark.parametrize("args,message", [
    ([], "give exactly one of --run RUN_ID or --model PATH_OR_ID"),
    (["--run", "nope"], "no run 'nope'"),
])
def test_eval_bad_input_is_one_line(tmp_path, args, message, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stderr = cli("eval", *args, "--runs-dir", str(tmp_path))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr


def test_a_run_trained_without_evaluation_is_found_scored_and_reported(tiny_cfg, tmp_path, cli):
    """--tasks none means "not now": report says how to score the run, eval --run scores it on the
    preset's suite, and outside a terminal lm-eval's progress is one line per task, not tqdm bars."""
    runs = tmp_path / "runs"
    execute(dataclasses.replace(tiny_cfg, method="lora", variant="lora", preset="smol-cpu", max_steps=2))
    (run,) = runs.iterdir()

    code, stderr = cli("report", "--runs", str(runs), "--out", str(tmp_path / "lb"))
    assert code == 2
    assert " ".join(stderr.split()) == (
        f"error: found 1 run under {runs}/, but it has no evaluation yet (trained with --tasks none?); score it "
        f"with `neobench eval --run {run}`, then run `neobench report --runs {runs}` again; nothing to report until one is scored"
    )

    code, scored = cli("eval", "--run", str(run))  # stderr is not a terminal here, as in CI or `make demo > log`
    assert code == 0, scored[-2000:]
    (evaluation,) = (run / "evaluations").glob("*.json")
    tasks = {r["task"] for e in json.loads(evaluation.read_text())["evaluations"] if e["role"] == "student" for r in e["rows"]}
    assert tasks == {"neo_heldout_nll", "neo_heldout_match", "neo_heldout_rougeL", "neo_pydoc_bpb", "neo_fidelity"}  # neo_suite
    assert "\r" not in scored and "it/s" not in scored, "tqdm bars leaked into a non-terminal"
    for line in ("neo_heldout_nll: 6 loglikelihood requests in", "neo_heldout_match: 24 loglikelihood requests in",
                 "neo_pydoc_bpb: 6 loglikelihood_rolling requests in"):
        assert line in scored, scored

    code, stderr = cli("report", "--runs", str(runs), "--out", str(tmp_path / "lb"))
    assert code == 0, stderr
    assert "collected 1 runs of smol-cpu" in stderr


def test_skip_done_finds_a_finished_twin_by_its_whole_configuration(tiny_cfg, tmp_path):
    import dataclasses
    from pathlib import Path

    import yaml

    from neobench.runs.store import finished_like

    cfg = dataclasses.replace(tiny_cfg, method="neo", eval_tasks="neo_heldout_nll")
    run = Path(cfg.runs_dir) / "tiny-neo-lora-s0-1"
    (run / "evaluations").mkdir(parents=True)
    stored = {k: v for k, v in cfg.to_dict().items() if k != "lr_scale"}  # written before lr_scale existed
    (run / "config.yaml").write_text(yaml.safe_dump({**stored, "runs_dir": "elsewhere", "log_to": "tensorboard"}))
    (run / "metrics.json").write_text("{}")
    assert finished_like(cfg) is None  # trained but never scored: not done
    (run / "evaluations" / "x.json").write_text("{}")
    assert finished_like(cfg) == run  # where it was kept and how it was watched do not matter
    assert finished_like(dataclasses.replace(cfg, lr_scale=1.0)) == run  # a missing field had its default
    for change in ({"seed": 1}, {"lr_scale": 3.16}, {"rank": 8}, {"eval_limit": 3}):
        assert finished_like(dataclasses.replace(cfg, **change)) is None, change


def test_budgets_train_each_budget_with_its_own_schedule_from_one_teacher_pass(tiny, tmp_path, cli):
    """--budgets 4,E: two runs per method, each cosine ending at its own last step; the parent runs the teacher
    over the data once (hidden-state cache) and no run process loads it."""
    import math

    from neobench.runs.results import load_results
    from neobench.training.loop import lr_multiplier

    flags = [f for f in tiny_flags(tiny, tmp_path / "runs") if f not in ("--max-steps", "2")]
    flags[flags.index("--tasks") + 1] = "neo_heldout_nll"
    flags[flags.index("--batch-size") + 1] = "2"
    code, stderr = cli("run", *flags, "--grad-accum", "1", "--method", "kd", "--budgets", "4,E", "--teacher-cache", "hidden",
                       "--lr", "1e-3")
    assert code == 0, stderr[-2000:]
    assert "teacher cache (hidden): the teacher ran on 24 examples" in stderr
    runs = sorted((tmp_path / "runs").iterdir())
    metrics = {json.loads((r / "metrics.json").read_text())["budget"]["steps"]: r for r in runs}
    assert sorted(metrics) == [4, 12], "E = one epoch: 24 examples in steps of 2"
    for steps, run in metrics.items():
        record = json.loads((run / "metrics.json").read_text())
        assert record["cost"]["teacher_cache"]["misses"] == 0 and not record["cost"]["teacher_cache"]["teacher_loaded"]
        log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        warmup = math.ceil(0.1 * steps)
        assert len(log) == steps
        assert log[-1]["lr"] == pytest.approx(1e-3 * lr_multiplier(steps - 1, steps, warmup)), "cosine ends at this budget"
    short = [json.loads(line) for line in (metrics[4] / "train_log.jsonl").read_text().splitlines()]
    long = [json.loads(line) for line in (metrics[12] / "train_log.jsonl").read_text().splitlines()]
    assert short[-1]["lr"] < 0.3e-3 < long[3]["lr"], "the shorter run is not a prefix of the longer one"
    rows = load_results(tmp_path / "runs")
    students = rows[(rows["model"] == "student") & (rows["metric"] == "nll")]
    assert sorted(zip(students["method"], students["steps"], students["seed"])) == [("kd", 4, 0), ("kd", 12, 0)]


@pytest.mark.parametrize("budgets,message", [
    ("12,x", "--budgets takes optimizer steps and E (one epoch), comma-separated, e.g. 12,48,192,E; got 'x'"),
    ("12,12", "--budgets names a budget twice"),
])
def test_bad_budgets_are_one_line(budgets, message, tmp_path, cli):
    code, stderr = cli("run", "--budgets", budgets, "--runs-dir", str(tmp_path / "runs"))
    assert code == 2 and stderr.strip().splitlines() == [f"error: {message}" + ("" if "twice" not in message else ": '12,12'")], stderr
    code, stderr = cli("run", "--budgets", "12", "--max-steps", "3", "--runs-dir", str(tmp_path / "runs"))
    assert code == 2 and "--budgets sets --max-steps for each budget; leave --max-steps out" in stderr
