"""Seconds per optimizer step, throughput and peak memory of each method on a preset.

    python benchmarks/step_cost.py [--preset smol-cpu] [--steps 4] [--methods sft,lora,kd,neo]

Each method trains for --steps optimizer steps in its own process (as `neobench run` does for a
matrix), so peak memory is that method's alone: process peak RSS on CPU, CUDA max allocated on
GPU. Prints a markdown table. A figure, not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smol-cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--methods", default="sft,lora,kd,neo")
    parser.add_argument("--variant", default=None, help="adapter variant for lora/neo (default: lora)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for method in args.methods.split(","):
            cmd = [sys.executable, "-m", "neobench.cli", "run", "--preset", args.preset, "--method", method,
                   "--max-steps", str(args.steps), "--runs-dir", runs_dir]
            if args.variant and method in ("lora", "neo"):
                cmd += ["--variant", args.variant]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for run in sorted(Path(runs_dir).iterdir()):
            rows.append(json.loads((run / "metrics.json").read_text()))

    cost0 = rows[0]["cost"]
    print(f"preset {args.preset}, {args.steps} steps, batch {rows[0]['budget']['batch_size']} x "
          f"accum {rows[0]['budget']['grad_accum']}, seq_len {rows[0]['budget']['seq_len']}, "
          f"{cost0['device']} {cost0['dtype']}, {cost0['torch_threads']} threads, {platform.processor() or platform.machine()}")
    print()
    print("| method | s/step | tokens/s | peak memory (GiB) | memory kind | trainable params |")
    print("|---|---:|---:|---:|---|---:|")
    for r in sorted(rows, key=lambda r: args.methods.split(",").index(r["method"])):
        c = r["cost"]
        label = f"{r['method']}+{r['variant']}" if r["variant"] else r["method"]
        print(f"| {label} | {c['seconds_per_step']:.2f} | {c['tokens_per_second']:.0f} | "
              f"{c['peak_memory_bytes'] / 2**30:.2f} | {c['memory_kind']} | {c['trainable_params'] / 1e6:.2f}M |")


if __name__ == "__main__":
    main()
