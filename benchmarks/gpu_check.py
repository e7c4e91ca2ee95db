"""`make gpu-check`: the CUDA path end to end, on the paper's shapes (random weights, no download).

    1. every method (sft, lora, kd, neo, minillm) trains 2 bf16 steps: teacher random:llama-3.1-8b,
       student random:llama-3.2-1b, seq_len 1,024, rank 128, kd_ratio 0.9;
    2. CUDA peak memory of kd vs neo;
    3. neo under DDP over every visible GPU (torchrun);
    4. one resume: neo killed after step 1 of 2 (its checkpoint written), resumed, compared with
       the straight run.

Prints a table and exits non-zero if anything failed. Needs a CUDA device; CI has none, so this
is not part of `make test`. --layers-scale shrinks both models' depth (e.g. 4 on a small GPU).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from paper_shape import long_conversations  # noqa: E402

METHODS = ("sft", "lora", "kd", "neo", "minillm")


def neobench_run(args: list[str], runs: Path, nproc: int = 1, env: dict | None = None) -> tuple[int, float]:
    launcher = [sys.executable, "-m", "neobench.cli"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "neobench.cli"]
    started = time.perf_counter()
    code = subprocess.run([*launcher, "run", *args, "--runs-dir", str(runs)], env={**os.environ, **(env or {})},
                          stdout=subprocess.DEVNULL).returncode
    return code, time.perf_counter() - started


def newest_run(runs: Path, method: str) -> Path:
    return max((p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".") and f"-{method}-" in p.name),
               key=lambda p: p.stat().st_mtime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers-scale", type=int, default=1, help="divide both models' depth by this")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA device and this machine has none; run it where `nvidia-smi` lists a GPU")
        return 2
    gpus = torch.cuda.device_count()
    teacher, student = f"random:llama-3.1-8b:{32 // args.layers_scale}", f"random:llama-3.2-1b:{16 // args.layers_scale}"
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="neobench-gpu-check-") as tmp:
        tmp = Path(tmp)
        data = long_conversations(tmp / "long.jsonl", turns=12, n=16)
        common = ["--preset", "paper-llama3.2", "--teacher", teacher, "--student", student, "--train-data", str(data),
                  "--train-split", "train", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--tasks", "none",
                  "--dtype", "bfloat16", "--device", "cuda"]

        def record(check: str, method: str, code: int, seconds: float, runs: Path, note: str = "") -> dict:
            nonlocal failed
            row = {"check": check, "method": method, "ok": code == 0, "seconds": seconds, "note": note}
            if code == 0:
                metrics = json.loads((newest_run(runs, method) / "metrics.json").read_text())
                row.update(s_per_step=metrics["cost"]["seconds_per_step"], peak=metrics["cost"]["peak_memory_bytes"],
                           loss=metrics["final"]["loss"], world=metrics["cost"]["world_size"])
            failed |= code != 0
            rows.append(row)
            return row

        for method in METHODS:
            code, seconds = neobench_run([*common, "--method", method], tmp / "single")
            record("bf16 train", method, code, seconds, tmp / "single")
        code, seconds = neobench_run([*common, "--method", "neo"], tmp / "ddp", nproc=gpus)
        record(f"DDP x{gpus}", "neo", code, seconds, tmp / "ddp", "" if gpus > 1 else "one GPU: world of 1")

        straight = tmp / "straight"
        code, _ = neobench_run([*common, "--method", "neo", "--save-weights"], straight)
        killed = tmp / "resume"
        neobench_run([*common, "--method", "neo", "--save-every", "1"], killed, env={"NEOBENCH_INJECT_FAULT": "kill-after-step:1"})
        unfinished = [p.name.removeprefix(".tmp-") for p in killed.glob(".tmp-*")]
        if code == 0 and len(unfinished) == 1:
            code, seconds = neobench_run(["--resume", unfinished[0]], killed)
        else:
            code, seconds = 1, 0.0
        note = ""
        if code == 0:
            from safetensors.torch import load_file

            a = load_file(glob.glob(str(newest_run(straight, "neo") / "*.safetensors"))[0])
            b = load_file(glob.glob(str(newest_run(killed, "neo") / "*.safetensors"))[0])
            diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
            note = f"max |straight - resumed| = {diff:.3g}"
        record("kill + resume", "neo", code, seconds, killed, note)

    print(f"neobench gpu-check: {torch.cuda.get_device_name(0)} x {gpus}, torch {torch.__version__}; "
          f"teacher {teacher}, student {student}, bf16, seq_len 1,024, batch 2, 2 steps")
    print(f"{'check':14} {'method':8} {'ok':3} {'s/step':>7} {'peak GiB':>9} {'loss':>8}  note")
    for r in rows:
        print(f"{r['check']:14} {r['method']:8} {'yes' if r['ok'] else 'NO':3} {r.get('s_per_step', float('nan')):7.2f} "
              f"{r.get('peak', 0) / 2**30:9.2f} {r.get('loss', float('nan')):8.4f}  {r['note']}")
    peaks = {r["method"]: r.get("peak") for r in rows if r["check"] == "bf16 train"}
    if peaks.get("kd") and peaks.get("neo"):
        print(f"CUDA peak memory neo / kd: {peaks['neo'] / peaks['kd']:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
