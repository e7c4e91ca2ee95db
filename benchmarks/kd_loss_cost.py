"""What the fused projection + loss and the teacher-logit cache buy, as figures (nothing passes or fails).

    python benchmarks/kd_loss_cost.py loss   [--tokens 2048] [--vocabs 49152,128256] [--hidden 576]
    python benchmarks/kd_loss_cost.py matrix [--preset smol-cpu] [--cache topk:64] [--max-steps N]

loss:   one step of the neo objective alone, 0.5 CE + 0.5 KL(teacher || student), forward and
        backward to the student's hidden states, from hidden states [tokens x hidden] of student
        and teacher and their output heads [vocab x hidden], three ways:
          naive  - both models' logits materialised, the loss in one piece;
          before - logits materialised, the divergence in checkpointed chunks (the code before
                   the fused step);
          fused  - neobench.training.fused_loss: projection and loss in token chunks, no [tokens x vocab] tensor.
        Each in its own process, so the peak memory (peak RSS above the inputs on CPU, CUDA max
        allocated on GPU) is that computation's alone.
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

WAYS = ("naive", "before", "fused")


def loss_step(tokens: int, vocab: int, hidden: int, way: str) -> dict:
    """Run in a child: time and peak memory of one loss forward + backward."""
    import torch
    import torch.nn.functional as F

    from neobench.training.fused_loss import LogitHead, LossSpec, TeacherHidden, fused_loss
    from neobench.training.losses import distillation_loss
    from neobench.training.memory import PeakMemory

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    student_hidden = torch.randn(tokens, hidden, device=device, requires_grad=True)
    teacher_hidden = torch.randn(tokens, hidden, device=device)
    student_w = torch.randn(vocab, hidden, device=device) / hidden**0.5
    teacher_w = torch.randn(vocab, hidden, device=device) / hidden**0.5
    targets = torch.randint(0, vocab, (tokens,), device=device)
    student_hidden.grad = torch.zeros_like(student_hidden)  # part of the inputs, not the loss
    with PeakMemory(device) as memory:
        baseline = memory.peak_bytes()
        start = time.perf_counter()
        if way == "fused":
            parts = fused_loss(student_hidden, LogitHead(student_w, None, vocab), targets,
                               TeacherHidden(teacher_hidden, LogitHead(teacher_w, None, vocab)), LossSpec(0.5, 0.5))
            loss = parts["loss"] / tokens
        else:
            student_logits = student_hidden @ student_w.t()
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_w.t()
            chunk = None if way == "naive" else 1024  # the old default loss_chunk_tokens
            loss = 0.5 * F.cross_entropy(student_logits.float(), targets) + 0.5 * distillation_loss(
                "forward_kl", student_logits, teacher_logits, 1.0, chunk_tokens=chunk)
        loss.backward()
        seconds = time.perf_counter() - start
        peak = memory.peak_bytes()
    return {"seconds": seconds, "extra_bytes": peak - baseline if memory.kind == "rss" else peak, "kind": memory.kind,
            "loss": float(loss), "grad_norm": float(student_hidden.grad.norm())}


def bench_loss(args) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(f"neo objective alone (0.5 CE + 0.5 forward KL, forward + backward), {args.tokens} tokens, hidden {args.hidden}, fp32\n")
    print("| vocabulary | computation | seconds | peak memory beyond the inputs (GiB) | memory vs naive | time vs naive | loss | |grad| |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for vocab in (int(v) for v in args.vocabs.split(",")):
        rows = {}
        for way in WAYS:
            code = (f"import json; from benchmarks.kd_loss_cost import loss_step; "
                    f"print(json.dumps(loss_step({args.tokens}, {vocab}, {args.hidden}, {way!r})))")
            out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=root)
            rows[way] = json.loads(out.stdout.strip().splitlines()[-1])
        naive = rows["naive"]
        for way, r in rows.items():
            print(f"| {vocab} | {way} | {r['seconds']:.2f} | {r['extra_bytes'] / 2**30:.2f} | "
                  f"{r['extra_bytes'] / naive['extra_bytes']:.2f} | {r['seconds'] / naive['seconds']:.2f} | "
                  f"{r['loss']:.6f} | {r['grad_norm']:.6f} |")


def bench_matrix(args) -> None:
    import shutil

    from neobench.models.loading import cache_dir

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
    loss.add_argument("--vocabs", default="49152,128256", help="comma-separated vocabulary sizes (SmolLM2, Llama 3)")
    loss.add_argument("--hidden", type=int, default=576)
    matrix = sub.add_parser("matrix")
    matrix.add_argument("--preset", default="smol-cpu")
    matrix.add_argument("--cache", default="topk:64")
    matrix.add_argument("--max-steps", type=int, default=0, help="optimizer steps per run (default: the preset's)")
    args = parser.parse_args()
    bench_loss(args) if args.what == "loss" else bench_matrix(args)


if __name__ == "__main__":
    main()
