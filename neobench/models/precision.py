"""Which dtype a run computes in, decided by what the hardware does natively.

    --dtype auto      bf16 where the device has native bf16 matmuls, fp32 elsewhere
    --dtype float32   fp32 everywhere
    --dtype bfloat16  bf16 compute even where it is emulated (slow on such CPUs; for comparisons)

A bf16 run is mixed precision: matmuls run in bf16 under ``torch.autocast``; every weight that
trains keeps an fp32 master copy (full fine-tuning loads the student in fp32; peft keeps
adapters in fp32 on a bf16 base); frozen weights (the teacher, an adapter method's base) are
held in bf16 outright; softmaxes, losses and reductions are fp32 (see neobench.training.fused_loss).

Native bf16: CUDA devices that report it; CPUs with AVX-512 BF16 or AMX. On a CPU without them
(AVX2, say) PyTorch emulates bf16 matmuls, several times slower than fp32, so ``auto`` keeps fp32.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from neobench.core.errors import NeobenchError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX, as PyTorch's own CPU dispatch sees it (or /proc/cpuinfo says)."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        if cpu is not None and hasattr(cpu, probe) and getattr(cpu, probe)():
            return True
    return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)


def has_native_bf16(device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def pick_dtype(name: str, device: str) -> torch.dtype:
    """The compute dtype for ``--dtype name`` on ``device``."""
    if name == "auto":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    if name == "float16":
        raise NeobenchError("dtype 'float16' is not supported (training it needs loss scaling); use bfloat16 or float32")
    if name not in DTYPES:
        raise NeobenchError(f"unknown dtype {name!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def autocast(device: str, dtype: torch.dtype):
    """Mixed-precision compute for a bf16 run; nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)
