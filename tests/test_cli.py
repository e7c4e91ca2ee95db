"""`neobench` as a user types it: run directories, the matrix, one-line errors."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml

from neobench.experiment import execute


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
    from neobench.config import load_preset
    from neobench.experiment import plan

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
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stderr = cli("run", *args, "--runs-dir", str(tmp_path / "runs"))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert not (tmp_path / "runs").exists()


def test_a_run_that_dies_leaves_nothing_behind(tiny_cfg, monkeypatch):
    import neobench.train

    def explode(*args, **kwargs):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(neobench.train, "train", explode)
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

    from neobench.synth import packaged_dataset

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


def test_ctrl_c_discards_the_unfinished_run_and_says_so(tiny, tmp_path):
    import signal
    import time

    flags = tiny_flags(tiny, tmp_path / "runs")
    flags[flags.index("--max-steps") + 1] = "100000"  # long enough to be interrupted mid-training
    proc = subprocess.Popen([sys.executable, "-m", "neobench.cli", "run", "--method", "sft", *flags],
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # A shell's background job starts with SIGINT ignored, and Python then keeps it
                            # ignored; a user's Ctrl-C always arrives, so restore the default here.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((tmp_path / "runs").glob(".tmp-*/train_log.jsonl")):
            time.sleep(0.5)
        time.sleep(2)  # a few steps in
        proc.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C would: the run stops after its step
        stderr = proc.communicate(timeout=120)[1]
    finally:  # never leave a 100000-step run behind to slow the tests after this one
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130
    assert "the unfinished run was discarded (no --save-every)" in stderr
    assert list((tmp_path / "runs").iterdir()) == []


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

    from neobench.runs import finished_like

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
