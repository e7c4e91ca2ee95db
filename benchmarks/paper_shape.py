"""The paper's setting at its real shapes, without a download: per-step time and peak memory of kd and neo.

    python benchmarks/paper_shape.py                      # CPU: 2 + 2 decoder layers, 3 steps
    python benchmarks/paper_shape.py --nproc 2            # the same under torchrun (DDP)
    python benchmarks/paper_shape.py --teacher-layers 32 --student-layers 16   # full depth (a GPU)

Teacher random:llama-3.1-8b, student random:llama-3.2-1b (neobench.models.loading: the published configs,
vocabulary 128,256, random weights), the paper preset's LoRA rank 128, kd_ratio 0.9 and seq_len
1,024. The data are the packaged Magpie conversations joined into multi-turn ones long enough to
fill (and be cut at) 1,024 tokens. Each method runs as `neobench run` in its own process (so its peak memory is
its own); seconds per step are the mean over the steps after the first (warm-up).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def long_conversations(out: Path, turns: int, n: int) -> Path:
    """``n`` rows of ``turns`` packaged Magpie exchanges each, as multi-turn chats."""
    from neobench.data.examples import resolve_data_file

    rows = [json.loads(line) for line in Path(resolve_data_file("magpie-smollm2", "train")).read_text().splitlines()]
    with out.open("w") as f:
        for i in range(n):
            messages = []
            for row in rows[i * turns : (i + 1) * turns]:
                messages += row["messages"] if "messages" in row else [
                    {"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["response"]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return out


def run_method(method: str, args, data: Path, runs: Path) -> dict:
    launcher = [sys.executable, "-m", "neobench.cli"]
    if args.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}", "-m", "neobench.cli"]
    cmd = [
        *launcher, "run", "--preset", "paper-llama3.2", "--method", method,
        "--teacher", f"random:llama-3.1-8b:{args.teacher_layers}", "--student", f"random:llama-3.2-1b:{args.student_layers}",
        "--train-data", str(data), "--train-split", "train", "--max-examples", str(args.steps * args.batch_size * args.grad_accum * args.nproc),
        "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
        "--tasks", "none", "--no-save-weights", "--runs-dir", str(runs), "--strategy", args.strategy, "--dtype", args.dtype,
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if not args.verbose else None)
    run_dir = max((p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".") and f"-{method}-" in p.name),
                  key=lambda p: p.stat().st_mtime)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steady = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(log, log[1:])] or [log[0]["elapsed_s"]]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip(log, log[1:])] or [log[0]["tokens"]]
    return {
        "method": method, "seconds_per_step": sum(steady) / len(steady), "tokens_per_s": sum(tokens) / sum(steady),
        "peak_bytes": metrics["cost"]["peak_memory_bytes"], "memory_kind": metrics["cost"]["memory_kind"],
        "trainable": metrics["cost"]["trainable_params"], "total": metrics["cost"]["total_params"],
        "dtype": metrics["cost"]["dtype"], "device": metrics["cost"]["device"], "world": metrics["cost"]["world_size"],
        "tokens_per_step": metrics["budget"]["tokens"] / metrics["budget"]["steps"],
    }


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-layers", type=int, default=32 if cuda else 2, help="of Llama-3.1-8B's 32")
    parser.add_argument("--student-layers", type=int, default=16 if cuda else 2, help="of Llama-3.2-1B's 16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4 if cuda else 1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--methods", default="kd,neo")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="neobench-paper-shape-") as tmp:
        data = long_conversations(Path(tmp) / "long.jsonl", turns=12, n=args.steps * args.batch_size * args.grad_accum * args.nproc)
        results = [run_method(m, args, data, Path(tmp) / "runs") for m in args.methods.split(",")]
    first = results[0]
    print(f"paper shapes: teacher Llama-3.1-8B x {args.teacher_layers}/32 layers, student Llama-3.2-1B x "
          f"{args.student_layers}/16 layers, vocab 128,256, seq_len 1,024, rank 128, kd_ratio 0.9; "
          f"{first['device']} {first['dtype']}, {first['world']} process(es), {args.strategy if first['world'] > 1 else 'single'}; "
          f"batch {args.batch_size} x {args.grad_accum} per process, {first['tokens_per_step']:.0f} tokens per step")
    print(f"{'method':8} {'s/step':>8} {'tok/s':>8} {'peak GiB':>9} {'trainable':>10} {'total':>8}")
    for r in results:
        print(f"{r['method']:8} {r['seconds_per_step']:8.2f} {r['tokens_per_s']:8.0f} {r['peak_bytes'] / 2**30:9.2f} "
              f"{r['trainable'] / 1e6:9.1f}M {r['total'] / 1e9:7.2f}B")
    by = {r["method"]: r for r in results}
    if "kd" in by and "neo" in by:
        print(f"neo / kd: time {by['neo']['seconds_per_step'] / by['kd']['seconds_per_step']:.2f}x, "
              f"peak memory {by['neo']['peak_bytes'] / by['kd']['peak_bytes']:.2f}x ({first['memory_kind']})")


if __name__ == "__main__":
    main()
