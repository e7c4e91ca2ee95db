"""The machine's matmul limit at the training step's shapes: fp32 and bf16 GFLOP/s (a figure, not a test).

    python benchmarks/matmul_limit.py [--preset smol-cpu] [--repeats 5]

Shapes are those of the default preset's step: one micro-batch of batch_size x seq_len tokens
through each linear layer of the student (attention q/k/v/o, MLP gate/up/down), and 128 scored
tokens through the output head. The limit of a dtype is the best of these (what a step could
reach if every FLOP ran at matmul speed); benchmarks/step_cost.py divides achieved FLOP/s by it.
"""

from __future__ import annotations

import argparse
import time

import torch


def step_shapes(preset: str) -> list[tuple[str, int, int, int]]:
    """(name, m, k, n) of the step's matmuls: tokens x in_features @ in_features x out_features."""
    from transformers import AutoConfig

    from neobench.models.loading import resolve_model
    from neobench.runs.config import load_preset

    cfg = load_preset(preset)
    config = AutoConfig.from_pretrained(resolve_model(cfg.teacher))
    d, ffn = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    tokens = cfg.batch_size * cfg.seq_len
    return [
        ("attention q/o", tokens, d, d), ("attention k/v", tokens, d, kv),
        ("mlp gate/up", tokens, d, ffn), ("mlp down", tokens, ffn, d),
        ("output head (128 tokens)", 128, d, config.vocab_size),
    ]


def gflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    for _ in range(2):  # warm-up: thread pool, caches, oneDNN kernel selection
        a @ b.t()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b.t()
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def limits(preset: str = "smol-cpu", repeats: int = 5) -> tuple[dict[str, float], list[tuple]]:
    """{dtype name: best GFLOP/s over the step's shapes}, and the per-shape rows."""
    rows, best = [], {}
    for name, m, k, n in step_shapes(preset):
        row = [name, f"{m}x{k} @ {k}x{n}"]
        for dtype in (torch.float32, torch.bfloat16):
            value = gflops(m, k, n, dtype, repeats)
            key = str(dtype).removeprefix("torch.")
            best[key] = max(best.get(key, 0.0), value)
            row.append(value)
        rows.append(tuple(row))
    return best, rows


def main() -> None:
    from neobench.models.precision import cpu_has_native_bf16

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smol-cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    best, rows = limits(args.preset, args.repeats)
    native = "native" if cpu_has_native_bf16() else "emulated (no AVX-512 BF16 / AMX)"
    print(f"matmul limit, {torch.get_num_threads()} threads, bf16 {native}\n")
    print("| matmul | shape | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |")
    print("|---|---|---:|---:|---:|")
    for name, shape, fp32, bf16 in rows:
        print(f"| {name} | {shape} | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f} |")
    print(f"| **limit (best)** | | **{best['float32']:.0f}** | **{best['bfloat16']:.0f}** | {best['bfloat16'] / best['float32']:.2f} |")


if __name__ == "__main__":
    main()
