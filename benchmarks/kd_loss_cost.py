"""What the memory-lean KD loss and the teacher-logit cache buy, as figures (nothing passes or fails).

    python benchmarks/kd_loss_cost.py loss   [--tokens 2048] [--vocab 49152] [--chunk 256]
    python benchmarks/kd_loss_cost.py matrix [--preset smol-cpu] [--cache topk:64] [--max-steps N]

loss:   one KD loss step (forward + backward of the divergence alone) on random logits of the
        default preset's shape, naive (one chunk) vs chunked; each in its own process, so the peak
        memory (peak RSS above the inputs on CPU, CUDA max allocated on GPU) is that step's alone.
matrix: wall time of the default method matrix (training only, --tasks none) with the teacher
        cache off, then on (emptied first, so its first KD run fills it and the others reuse it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def loss_step(tokens: int, vocab: int, chunk: int, name: str) -> dict:
    """Run in a child: time and peak memory of one divergence forward + backward."""
    import torch

    from neobench.losses import distillation_loss
    from neobench.train import PeakMemory

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    student = torch.randn(tokens, vocab, device=device, requires_grad=True)
    teacher = torch.randn(tokens, vocab, device=device)
    student.grad = torch.zeros_like(student)  # allocated up front: part of the inputs, not the loss
    with PeakMemory(device) as memory:
        baseline = memory.peak_bytes()
        start = time.perf_counter()
        distillation_loss(name, student, teacher, 1.0, chunk_tokens=chunk or None).backward()
        seconds = time.perf_counter() - start
        peak = memory.peak_bytes()
    return {"seconds": seconds, "extra_bytes": peak - baseline if memory.kind == "rss" else peak, "kind": memory.kind}


def bench_loss(args) -> None:
    rows = {}
    for label, chunk in (("naive", 0), (f"chunked ({args.chunk} tokens)", args.chunk)):
        code = (f"import json; from benchmarks.kd_loss_cost import loss_step; "
                f"print(json.dumps(loss_step({args.tokens}, {args.vocab}, {chunk}, {args.loss!r})))")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        rows[label] = json.loads(out.stdout.strip().splitlines()[-1])
    naive = rows["naive"]
    print(f"{args.loss} loss step, {args.tokens} tokens x {args.vocab} vocabulary, fp32 ({naive['kind']})\n")
    print("| computation | seconds | peak memory beyond the inputs (GiB) | memory vs naive |")
    print("|---|---:|---:|---:|")
    for label, r in rows.items():
        print(f"| {label} | {r['seconds']:.2f} | {r['extra_bytes'] / 2**30:.2f} | {r['extra_bytes'] / naive['extra_bytes']:.2f} |")


def bench_matrix(args) -> None:
    import shutil

    from neobench.models import cache_dir

    times = {}
    for cache in ("off", args.cache):
        # An empty teacher-logit cache, so the cached matrix pays for filling it (its first KD run).
        shutil.rmtree(cache_dir() / "teacher-logits", ignore_errors=True)
        with tempfile.TemporaryDirectory() as runs_dir:
            start = time.perf_counter()
            steps = ["--max-steps", str(args.max_steps)] if args.max_steps else []
            subprocess.run([sys.executable, "-m", "neobench.cli", "run", "--preset", args.preset, "--tasks", "none",
                            "--teacher-cache", cache, "--runs-dir", runs_dir, *steps],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[cache] = time.perf_counter() - start
    steps = f"{args.max_steps} steps per run" if args.max_steps else "the preset's steps"
    print(f"method matrix of {args.preset}, {steps} (training only; the teacher-logit cache emptied first)\n")
    print("| teacher cache | wall seconds | vs off |")
    print("|---|---:|---:|")
    for cache, seconds in times.items():
        print(f"| {cache} | {seconds:.0f} | {seconds / times['off']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    loss = sub.add_parser("loss")
    loss.add_argument("--tokens", type=int, default=2048)
    loss.add_argument("--vocab", type=int, default=49152)
    loss.add_argument("--chunk", type=int, default=256)
    loss.add_argument("--loss", default="forward_kl")
    matrix = sub.add_parser("matrix")
    matrix.add_argument("--preset", default="smol-cpu")
    matrix.add_argument("--cache", default="topk:64")
    matrix.add_argument("--max-steps", type=int, default=0, help="optimizer steps per run (default: the preset's)")
    args = parser.parse_args()
    bench_loss(args) if args.what == "loss" else bench_matrix(args)


if __name__ == "__main__":
    main()
