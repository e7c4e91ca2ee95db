"""Seconds per step, throughput, peak memory and share of the matmul limit, per method and dtype,
for this code and for an earlier commit (a figure, not a test).

    python benchmarks/step_cost.py [--preset smol-cpu] [--steps 3] [--methods sft,lora,kd,neo,minillm]
                                   [--dtypes float32,bfloat16] [--before REV | --before none] [--no-cache]
                                   [--compile]

Each (code, method, dtype) trains --steps optimizer steps in its own `neobench run` process
(--tasks none), so its peak memory is its own: process peak RSS during training on CPU, CUDA max
allocated on GPU. "before" is git revision REV (default: the last commit before the throughput
work of issue 24) checked out in a temporary worktree and run with the same Python, in the same
dtypes. Both run the teacher online (--teacher-cache off). "after+cache" rows (kd and neo) read
every teacher output from a complete hidden-state cache, filled by one untimed run of the same
steps first: what every run of a study after the first pass costs. --dtypes defaults to float32,
plus bfloat16 where it is native. --compile adds "after+compile" and "after+cache+compile" rows:
the same runs with `neobench run --compile` (kd and neo).

Time per step: "s/step" is the run's training time over its steps (step 1 included, as before);
"s/step 2..N" the median of steps 2..N, which leaves out one-off work such as --compile's
compiling (its first step's seconds are in "step 1 (s)"). GFLOP/s and the speed ratios use the
latter; tokens/s is the tokens of steps 2..N over their seconds.

FLOPs of a step, counted from the model configs (adapter FLOPs, norms and element-wise work are
left out):
  forward of a model  = tokens x (2 x linear params of its layers + 4 x layers x hidden x mean length)
                        + scored tokens x 2 x vocabulary x hidden          (the output head)
  student backward    = 1 x its forward (activation gradients), + 1 x more when all weights train
  teacher             = forward only (nothing when every example came from the teacher-logit cache)
The old code projected every position through the head; it is credited with the same useful FLOPs.
minillm samples its own sequences, so its FLOPs are not counted (n/a).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEFORE_THROUGHPUT = "480a06f"
"""The last commit before the throughput work of issue 24 (hidden-state teacher cache, fused AdamW, ...)."""


def layer_linear_params(config) -> tuple[int, int]:
    """(linear parameters per decoder layer, layers) of a transformers config."""
    d, ffn = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return d * q + 2 * d * kv + q * d + 3 * d * ffn, config.num_hidden_layers


def forward_flops(config, tokens: int, scored: int, mean_length: float, vocab: int) -> float:
    per_layer, layers = layer_linear_params(config)
    return tokens * (2 * per_layer * layers + 4 * layers * config.hidden_size * mean_length) + scored * 2 * vocab * config.hidden_size


def step_flops(metrics: dict) -> float | None:
    """Useful FLOPs of one optimizer step of a finished run (see the module docstring)."""
    from transformers import AutoConfig

    if metrics["method"] == "minillm":
        return None
    budget = metrics["budget"]
    steps = budget["steps"]
    tokens, scored = budget["tokens"] / steps, budget["response_tokens"] / steps
    mean_length = budget["tokens"] / budget["examples_seen"]
    student = AutoConfig.from_pretrained(metrics["student_path"])
    vocab = student.vocab_size
    forward = forward_flops(student, tokens, scored, mean_length, vocab)
    full = metrics["variant"] is None
    total = forward * (3 if full else 2)
    cache = metrics["cost"].get("teacher_cache", {})
    teacher_ran = metrics["loss"] is not None and not (cache.get("mode", "off") != "off" and cache.get("misses") == 0)
    if teacher_ran:
        total += forward_flops(AutoConfig.from_pretrained(metrics["teacher_path"]), tokens, scored, mean_length, vocab)
    return total


def run_one(code_dir: Path, preset: str, method: str, dtype: str, steps: int, runs_dir: str, cache: str = "off",
            compiled: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code_dir))
    cmd = [sys.executable, "-m", "neobench.cli", "run", "--preset", preset, "--method", method, "--dtype", dtype,
           "--max-steps", str(steps), "--tasks", "none", "--runs-dir", runs_dir, "--teacher-cache", cache]
    cmd += ["--compile"] if compiled else []
    done = subprocess.run(cmd, cwd=code_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} ({dtype}) in {code_dir} failed:\n{done.stderr[-2000:]}")
    run = max(Path(runs_dir).iterdir(), key=lambda p: p.stat().st_mtime)
    metrics = json.loads((run / "metrics.json").read_text())
    log = train_log(run)
    metrics["step_seconds"], metrics["step_tokens"] = per_step(log, "elapsed_s"), per_step(log, "tokens")
    return metrics


def train_log(run: Path) -> list[dict]:
    """A finished run's train_log.jsonl rows, one per optimizer step."""
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]


def per_step(log: list[dict], counter: str) -> list[float]:
    """Each step's share of a running total in the log (elapsed_s: its seconds; tokens: its tokens)."""
    totals = [0] + [row[counter] for row in log]
    return [b - a for a, b in zip(totals, totals[1:])]


def steady_tokens_per_second(metrics: dict) -> float:
    """Tokens over seconds of steps 2..N (all steps when there is one)."""
    times, tokens = metrics["step_seconds"], metrics["step_tokens"]
    later = slice(1, None) if len(times) > 1 else slice(None)
    return sum(tokens[later]) / sum(times[later])


def steady_seconds(metrics: dict) -> float:
    """Median seconds of steps 2..N (all steps when there is one)."""
    import statistics

    times = metrics["step_seconds"]
    return statistics.median(times[1:] or times)


def worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(where), rev],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return where


def main() -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.matmul_limit import limits
    from neobench.models.precision import cpu_bf16_kernel, cpu_has_native_bf16

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smol-cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", default="sft,lora,kd,neo,minillm")
    parser.add_argument("--dtypes", default=None, help="comma-separated; default float32 (+ bfloat16 where native)")
    parser.add_argument("--before", default=BEFORE_THROUGHPUT, help="git revision to compare with, or 'none'")
    parser.add_argument("--no-cache", action="store_true", help="leave out the after+cache rows")
    parser.add_argument("--compile", action="store_true", help="add after+compile (and after+cache+compile) rows: "
                        "`neobench run --compile`, kd and neo")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",") if args.dtypes else ["float32"] + (["bfloat16"] if cpu_has_native_bf16() else [])
    methods = args.methods.split(",")

    limit, _ = limits(args.preset)
    rows: list[tuple[str, str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        plans = [("after", REPO, d) for d in dtypes]
        if args.before != "none":
            before_dir = worktree(args.before, Path(tmp) / "before")
            plans = [p for d in dtypes for p in (("before", before_dir, d), ("after", REPO, d))]
        if not args.no_cache:
            plans += [("after+cache", REPO, d) for d in dtypes]
        if args.compile:
            plans += [("after+compile", REPO, d) for d in dtypes]
            plans += [("after+cache+compile", REPO, d) for d in dtypes] if not args.no_cache else []
        filled: set[str] = set()
        try:
            for code, code_dir, dtype in plans:
                for method in methods:
                    if code != "after" and code.startswith("after") and method not in ("kd", "neo"):
                        continue
                    if "cache" in code:
                        if method not in ("kd", "neo"):
                            continue
                        if dtype not in filled:  # kd and neo read the same entries (same steps, seed and dtype)
                            print(f"... filling the teacher cache ({dtype})", file=sys.stderr, flush=True)
                            run_one(code_dir, args.preset, method, dtype, args.steps, f"{tmp}/runs-fill", cache="hidden")
                            filled.add(dtype)
                    print(f"... {code} {method} {dtype}", file=sys.stderr, flush=True)
                    cache = "hidden" if "cache" in code else "off"
                    rows.append((code, dtype, run_one(code_dir, args.preset, method, dtype, args.steps, f"{tmp}/runs-{code}",
                                                      cache, compiled="compile" in code)))
        finally:
            if args.before != "none":
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(Path(tmp) / "before")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                shutil.rmtree(Path(tmp) / "before", ignore_errors=True)

    first = rows[0][2]
    print(f"preset {args.preset}, {args.steps} steps of batch {first['budget']['batch_size']} x accum "
          f"{first['budget']['grad_accum']}, seq_len {first['budget']['seq_len']}, {first['cost']['device']}, "
          f"{first['cost']['torch_threads']} threads, {platform.processor() or platform.machine()}, bf16 matmuls on "
          f"{cpu_bf16_kernel()}; matmul limit fp32 {limit['float32']:.0f}, bf16 {limit['bfloat16']:.0f} GFLOP/s\n")
    before = {(r["method"], d): r for code, d, r in rows if code == "before"}
    print("| code | method | dtype | step 1 (s) | s/step | s/step 2..N | tokens/s | peak memory (GiB) | GFLOP/s | share of limit "
          "| speed vs before | memory vs before |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for code, dtype, r in rows:
        c = r["cost"]
        flops = step_flops(r)
        achieved = flops / steady_seconds(r) / 1e9 if flops else None
        old = before.get((r["method"], dtype))
        speed = f"{steady_seconds(old) / steady_seconds(r):.2f}x" if old and code != "before" else ""
        memory = f"{c['peak_memory_bytes'] / old['cost']['peak_memory_bytes']:.2f}x" if old and code != "before" else ""
        label = f"{r['method']}+{r['variant']}" if r["variant"] else r["method"]
        print(f"| {code} | {label} | {dtype} | {r['step_seconds'][0]:.1f} | {c['seconds_per_step']:.2f} | {steady_seconds(r):.2f} | "
              f"{steady_tokens_per_second(r):.0f} | "
              f"{c['peak_memory_bytes'] / 2**30:.2f} | {f'{achieved:.0f}' if achieved else 'n/a'} | "
              f"{f'{achieved / limit[dtype]:.0%}' if achieved else 'n/a'} | {speed} | {memory} |")
    for code in ("before", "after", "after+cache", "after+compile", "after+cache+compile"):
        same = {(r["method"], d): r for c, d, r in rows if c == code}
        for dtype in dtypes:
            kd, neo = same.get(("kd", dtype)), same.get(("neo", dtype))
            if kd and neo:
                print(f"\nneo vs kd ({code}, {dtype}): peak memory {neo['cost']['peak_memory_bytes'] / kd['cost']['peak_memory_bytes']:.2f}x, "
                      f"time per step (2..N) {steady_seconds(neo) / steady_seconds(kd):.2f}x")


if __name__ == "__main__":
    main()
