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


def cpu_bf16_kernel() -> str:
    """Which bf16 matmul this CPU runs, as oneDNN reports it: "amx", "avx512_bf16", "emulated" (oneDNN on
    an older ISA), "none" (PyTorch's own kernels: no native bf16), or "unknown" (the log could not be read).

    Measured rather than inferred from flags: one small bf16 matmul runs with oneDNN's verbose
    log on, and the ISA of the implementation it chose is read from that log (written to the
    process's stdout by C code, so the file descriptor is redirected around it). On AMX-BF16
    the bf16 matmul limit is several times AVX-512 BF16's.
    """
    import os
    import sys
    import tempfile

    if not torch.backends.mkldnn.is_available():
        return "none"
    try:  # a diagnostic: it must never cost a run (closed stdout, a build without oneDNN's verbose mode)
        sys.stdout.flush()
        saved = os.dup(1)
        with tempfile.TemporaryFile() as log:
            os.dup2(log.fileno(), 1)
            try:
                with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                    torch.ones(64, 64, dtype=torch.bfloat16) @ torch.ones(64, 64, dtype=torch.bfloat16)
            finally:
                os.dup2(saved, 1)
                os.close(saved)
            log.seek(0)
            text = log.read().decode(errors="replace")
    except (OSError, AssertionError, RuntimeError):
        return "unknown"
    # onednn_verbose,[timestamp,]v1,primitive,exec,cpu,matmul,<implementation>,...: the field after "matmul"
    impls = []
    for line in text.splitlines():
        fields = line.split(",")
        if "exec" in fields and "matmul" in fields and fields.index("matmul") + 1 < len(fields):
            impls.append(fields[fields.index("matmul") + 1])
    if any("amx" in impl for impl in impls):
        return "amx"
    if any("avx512_core_bf16" in impl or "avx10" in impl for impl in impls):
        return "avx512_bf16"
    return "emulated" if impls else "none"
