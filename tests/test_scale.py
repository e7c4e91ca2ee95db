"""Scaling out and surviving: 1 vs 2 processes (DDP, FSDP2), exact resume after SIGKILL, divergence, paper shapes."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kill_tree
import torch
from safetensors.torch import load_file

from neobench.runs.config import RunConfig
from neobench.training.loop import train
from neobench.training.workspace import prepare

HERE = Path(__file__).parent
TIME_FIELDS = {"elapsed_s", "tokens_per_s"}


def tiny_config(tiny, tmp_path, **changes) -> RunConfig:
    base = RunConfig(
        preset="tiny", teacher=str(tiny["teacher"]), student=str(tiny["student"]), train_data=str(tiny["data"]),
        seq_len=64, batch_size=2, grad_accum=4, max_steps=3, lr=1e-2, rank=4, runs_dir=str(tmp_path / "runs"),
        eval_tasks="none", eval_data=str(tiny["data"]), eval_split="train", eval_limit=6, eval_batch_size=4,
        max_grad_norm=0.0, warmup_ratio=0.0, dtype="float32",  # fp32 on every CPU: the bounds below are fp32's
    )
    return dataclasses.replace(base, **changes)


# SGD for every strategy x {full fine-tuning, LoRA}; AdamW (looser bound) for one of each.
TWO_PROCESS_CASES = [(st, m, "sgd") for st in ("ddp", "fsdp") for m in ("kd", "neo")] + [("ddp", "kd", "adamw"), ("fsdp", "neo", "adamw")]


@pytest.fixture(scope="module")
def two_process_runs(tiny, tmp_path_factory):
    """One torchrun launch (2 gloo processes) trains every case; weights land in OUT/<case>.safetensors.

    Each process has grad_accum 2 against the single process's 4: the same global batch of 8.
    """
    out = tmp_path_factory.mktemp("two-processes")
    plan = []
    for strategy, method, optimizer in TWO_PROCESS_CASES:
        cfg = tiny_config(tiny, out, method=method, strategy=strategy, optimizer=optimizer, grad_accum=2)
        plan.append({"name": f"{strategy}-{method}-{optimizer}", "config": cfg.to_dict()})
    # A checkpoint written by 2 processes (stopped after step 2 of 3), for the 1-process resume below.
    cfg = tiny_config(tiny, out, method="neo", strategy="fsdp", optimizer="sgd", grad_accum=2, save_every=1)
    plan.append({"name": "fsdp-neo-stopped", "config": cfg.to_dict(), "stop_after": 2})
    # A whole run as `neobench run --nproc 2` makes it: run directory, evaluation, per-rank memory.
    cfg = tiny_config(tiny, out, method="neo", grad_accum=2, eval_tasks="neo_heldout_nll", eval_limit=4)
    plan.append({"name": "whole-run", "config": cfg.to_dict(), "execute": True})
    (out / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "NEOBENCH_CACHE": str(out / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(HERE / "helpers" / "distributed_worker.py"), str(out / "plan.json"), str(out)],
        capture_output=True, text=True, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("strategy,method,optimizer", TWO_PROCESS_CASES, ids=["-".join(c) for c in TWO_PROCESS_CASES])
def test_two_processes_train_what_one_process_trains(two_process_runs, tiny, tmp_path, strategy, method, optimizer):
    """kd: full fine-tuning with a tied embedding; neo: a LoRA adapter."""
    cfg = tiny_config(tiny, tmp_path, method=method, optimizer=optimizer)
    one = train(cfg, prepare(cfg)).weights
    two = load_file(str(two_process_runs / f"{strategy}-{method}-{optimizer}.safetensors"))
    # AdamW divides by sqrt(v): where a gradient entry is ~0, reduction-order noise of 1e-9 moves
    # the update by up to lr. Measured here: 0 for SGD and AdamW alike (2 ranks sum commutatively).
    assert max_difference(one, two) <= (1e-6 if optimizer == "sgd" else 1e-5)


def test_a_two_process_run_is_written_once_and_reported_as_the_same_budget(two_process_runs, tiny, tmp_path):
    from neobench.runs.execute import execute
    from neobench.runs.results import load_results

    runs = two_process_runs / "runs"
    assert [p.name for p in runs.iterdir()] == ["whole-run"], "rank 0 alone writes the run"
    metrics = json.loads((runs / "whole-run" / "metrics.json").read_text())
    assert metrics["budget"]["world_size"] == 2 and metrics["budget"]["global_batch"] == 8
    assert len(metrics["cost"]["peak_memory_bytes_per_rank"]) == 2
    assert metrics["cost"]["peak_memory_bytes"] == max(metrics["cost"]["peak_memory_bytes_per_rank"])
    assert len(list((runs / "whole-run" / "evaluations").glob("*.json"))) == 1, "evaluated once"
    # One process with twice the accumulation: the same budget and config key in the report.
    single = tiny_config(tiny, tmp_path, method="neo", grad_accum=4, eval_tasks="neo_heldout_nll", eval_limit=4)
    execute(single, run_id="one-process")
    rows = load_results(runs), load_results(tmp_path / "runs")
    students = [r[r["model"] == "student"].iloc[0] for r in rows]
    for column in ("config_key", "steps", "tokens", "grad_accum", "batch_size", "data_hash"):
        assert students[0][column] == students[1][column], column


def test_a_checkpoint_of_two_processes_resumes_on_one(two_process_runs, tiny, tmp_path):
    from neobench.training import checkpoint as ckpt

    run_tmp = two_process_runs / "fsdp-neo-stopped" / ".tmp-run"
    saved = ckpt.latest(run_tmp)
    assert ckpt.read_state(saved)["step"] == 2 and ckpt.read_state(saved)["world_size"] == 2
    cfg = tiny_config(tiny, tmp_path, method="neo", optimizer="sgd")
    resumed = train(cfg, prepare(cfg), run_tmp=run_tmp, resume=saved)
    straight = train(cfg, prepare(cfg))
    assert [r["step"] for r in resumed.log] == [3]
    assert max_difference(resumed.weights, straight.weights) <= 1e-6
    assert resumed.record["resumed_from_step"] == 2


def run_config(tiny, runs: Path, method: str) -> RunConfig:
    return RunConfig(
        preset="tiny", method=method, teacher=str(tiny["teacher"]), student=str(tiny["student"]), train_data=str(tiny["data"]),
        seq_len=64, batch_size=2, grad_accum=2, max_steps=4, rank=4, lr=1e-3, runs_dir=str(runs), eval_tasks="neo_heldout_nll",
        eval_data=str(tiny["data"]), eval_split="train", eval_limit=4, minillm_max_new_tokens=4,
        dropout=0.1 if method == "lora" else 0.0,
    )


def student_scores(run_dir: Path) -> list:
    payload = json.loads(next((run_dir / "evaluations").glob("*.json")).read_text())
    return [(r["task"], r["metric"], r["value"]) for e in payload["evaluations"] if e["role"] == "student" for r in e["rows"]]


RESUMED = ["sft", "lora", "kd", "neo", "minillm"]


@pytest.fixture(scope="module")
def killed_runs(tiny, tmp_path_factory):
    """For each method, the process that trains a run (started as `neobench run` starts one per run),
    SIGKILLed after its step-2 checkpoint. All five at once: their start-up is mostly waiting."""
    import yaml

    root = tmp_path_factory.mktemp("killed")
    procs = {}
    for method in RESUMED:
        cfg = dataclasses.replace(run_config(tiny, root / method, method), save_every=2)
        (root / f"{method}.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        procs[method] = subprocess.Popen(
            [sys.executable, "-m", "neobench.cli", "run", "--preset", str(root / f"{method}.yaml"), "--run-id", "killed-run"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "NEOBENCH_INJECT_FAULT": "kill-after-step:2", "NEOBENCH_CACHE": str(root / "cache"),
                 "OMP_NUM_THREADS": "1"},
        )
    codes = {method: (proc.wait(), proc.stderr.read()) for method, proc in procs.items()}
    return root, codes


@pytest.mark.parametrize("method", RESUMED)
def test_a_run_killed_after_its_checkpoint_resumes_exactly(killed_runs, tiny, tmp_path, cli, method):
    from neobench.runs.execute import execute

    root, codes = killed_runs
    code, stderr = codes[method]
    assert code == -9, stderr[-2000:]  # SIGKILL: no handler ran, no clean-up
    killed = root / method
    (unfinished,) = list(killed.iterdir())
    assert unfinished.name == ".tmp-killed-run" and (unfinished / "checkpoint" / "latest").is_file()
    code, stderr = cli("report", "--runs", str(killed), "--out", str(tmp_path / "boards"))
    assert code == 2 and "no runs under" in stderr, "a killed run is not a result"

    code, stderr = cli("run", "--resume", "killed-run", "--runs-dir", str(killed))
    assert code == 0, stderr[-2000:]
    execute(run_config(tiny, tmp_path / "straight", method), run_id="straight-run")
    resumed_dir, straight_dir = killed / "killed-run", tmp_path / "straight" / "straight-run"

    resumed, straight = (load_file(str(d / "trained_weights.safetensors")) for d in (resumed_dir, straight_dir))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in resumed)
    rows = [[{k: v for k, v in json.loads(line).items() if k not in TIME_FIELDS}
             for line in (d / "train_log.jsonl").read_text().splitlines()] for d in (resumed_dir, straight_dir)]
    assert rows[0] == rows[1] and len(rows[0]) == 4
    assert student_scores(resumed_dir) == student_scores(straight_dir) != []
    metrics = json.loads((resumed_dir / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2 and not (resumed_dir / "checkpoint").exists()


def test_ctrl_c_stops_a_two_process_run_after_its_step_with_a_checkpoint_that_resumes(tiny, tmp_path, cli, watchdog):
    """Ctrl-C to `neobench run --nproc 2` alone: torchrun gets it once (forwarded), passes it to both
    ranks, and they leave the loop at the same step, write its checkpoint and exit; the parent says
    so. Each rank waits for the signal inside step 1 (wait-for-signal-at), so it lands mid-step."""
    import signal

    runs = tmp_path / "runs"
    flags = ["--teacher", str(tiny["teacher"]), "--student", str(tiny["student"]), "--train-data", str(tiny["data"]),
             "--seq-len", "64", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "3", "--rank", "4",
             "--dtype", "float32", "--tasks", "none", "--save-every", "5", "--runs-dir", str(runs)]
    proc = subprocess.Popen([sys.executable, "-m", "neobench.cli", "run", "--method", "neo", "--nproc", "2", *flags],
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "NEOBENCH_INJECT_FAULT": "wait-for-signal-at:inside-step:1"})
    watchdog(proc)
    try:
        seen = []
        for line in proc.stderr:  # until both ranks wait inside step 1
            seen.append(line)
            if "".join(seen).count("waiting for a signal at inside-step:1\n") == 2:
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=300)[1]
    finally:  # never leave a run process behind (torchrun runs in a session of its own)
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
    lines = "".join(seen).splitlines() + rest.splitlines()
    assert proc.returncode == 130, "\n".join(lines[-40:])
    (tmp,) = runs.iterdir()
    run_id = tmp.name.removeprefix(".tmp-")
    assert (f"stopped after step 1; checkpoint in {tmp}/checkpoint/step-000001; continue with "
            f"`neobench run --resume {run_id} --runs-dir {runs}`") in lines, "\n".join(lines[-40:])
    assert "stopped at run 1/1; no run had finished" in lines
    code, stderr = cli("run", "--resume", run_id, "--runs-dir", str(runs))  # on one process: the same global batch
    assert code == 0, stderr[-2000:]
    metrics = json.loads((runs / run_id / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 1 and metrics["budget"]["steps"] == 3


def test_resume_refuses_what_it_cannot_do_in_one_line(tiny, tmp_path, cli):
    code, stderr = cli("run", "--resume", "nope", "--runs-dir", str(tmp_path))
    assert code == 2 and "no unfinished run 'nope'" in stderr
    code, stderr = cli("run", "--resume", "nope", "--lr", "0.1", "--runs-dir", str(tmp_path))
    assert code == 2 and "drop --lr" in stderr
    (tmp_path / ".tmp-x").mkdir()
    code, stderr = cli("run", "--resume", "x", "--runs-dir", str(tmp_path))
    assert code == 2 and "has no checkpoint (it ran without --save-every)" in stderr


def test_a_diverging_run_stops_in_one_line_and_stores_no_result(tiny, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("NEOBENCH_INJECT_FAULT", "nan-at-step:2")
    runs = tmp_path / "runs"
    flags = ["--method", "neo", "--teacher", str(tiny["teacher"]), "--student", str(tiny["student"]), "--train-data",
             str(tiny["data"]), "--seq-len", "64", "--max-steps", "3", "--rank", "4", "--runs-dir", str(runs), "--tasks", "none"]
    code, stderr = cli("run", *flags)
    assert code == 4, stderr[-2000:]
    line = next(l for l in stderr.splitlines() if "diverged" in l)
    assert "neo+lora seed 0 diverged at step 2: loss nan; last finite loss" in line and "at step 1; no result stored" in line
    (left,) = list(runs.iterdir())
    assert left.name.startswith(".tmp-"), "the unfinished run is kept for inspection, as a dot-directory"
    assert "diverged at step 2" in json.loads((left / "failure.json").read_text())["message"]


def test_a_huge_learning_rate_is_caught_by_the_guard(tiny, tmp_path):
    from neobench.training.loop import Diverged

    cfg = tiny_config(tiny, tmp_path, method="sft", lr=1e30, max_steps=6, grad_accum=1)
    with pytest.raises(Diverged, match="sft seed 0 diverged at step"):
        train(cfg, prepare(cfg))


@pytest.mark.paper_shape
@pytest.mark.embedded  # the random models' tokenizer comes from the embedded GGUF; cached across tests
@pytest.mark.skipif(not os.environ.get("NEOBENCH_TEST_PAPER_SHAPE"), reason="about a minute and 10 GB: `make test-paper-shape`")
def test_the_paper_preset_trains_kd_and_neo_on_random_paper_shape_models(tmp_path):
    from neobench.runs.config import load_preset

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {i}."},
                                                      {"role": "assistant", "content": " ".join(map(str, range(i + 3)))}]}) + "\n"
                            for i in range(4)))
    base = dataclasses.replace(
        load_preset("paper-llama3.2"), teacher="random:llama-3.1-8b:1", student="random:llama-3.2-1b:1",
        train_data=str(data), max_examples=None, seq_len=64, batch_size=1, grad_accum=1, max_steps=2,
        eval_tasks="none", runs_dir=str(tmp_path / "runs"),
    )
    ws = prepare(base)
    assert ws.vocab_size == 128_256
    for method in ("kd", "neo"):
        cfg = dataclasses.replace(base, method=method)
        run = train(cfg, ws)
        assert len(run.log) == 2 and all(r["loss"] == r["loss"] for r in run.log)
        if method == "kd":  # Llama-3.2-1B ties its output head to its embedding
            assert run.student.get_output_embeddings().weight is run.student.get_input_embeddings().weight
            assert run.record["cost"]["total_params"] == 2048 * 128_256 + 60_821_504 + 2048
    teacher = ws.teacher()
    assert teacher.config.hidden_size == 4096 and teacher.get_output_embeddings().weight.shape == (128_256, 4096)


def test_resuming_on_another_process_count_keeps_the_global_batch():
    from neobench.core.errors import NeobenchError
    from neobench.runs.execute import same_global_batch

    cfg = RunConfig(batch_size=2, grad_accum=3)
    assert same_global_batch(cfg, 2, 1).grad_accum == 6 and same_global_batch(cfg, 2, 3).grad_accum == 2
    assert same_global_batch(cfg, 2, 2) is cfg
    with pytest.raises(NeobenchError, match="4 processes cannot keep that global batch"):
        same_global_batch(cfg, 2, 4)
