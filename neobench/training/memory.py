"""Peak memory of a block of work: what a run records as its memory cost, and what benchmarks measure."""

from __future__ import annotations

import ctypes
import resource
import sys

import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_kept = None


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for the next allocation instead of returning it to the system.

    By default glibc serves every block over its mmap threshold (128 kB, adapting up to 32 MB)
    with a fresh mmap and unmaps it on free, so each [256 x 49,152] fp32 tile of the fused loss
    (50 MB), and many activations, costs a page fault per 4 kB page every time: measured as long
    as the loss's arithmetic. Serving them from the heap and never trimming it reuses those pages.
    Results are bit-identical (only where memory comes from changes). The cost is a heap that
    fragments: over 192 steps full fine-tuning's peak RSS grew by a fifth to a third, adapters'
    hardly (README, Speed). Once per process, Linux with glibc only; True if set.
    """
    global _kept
    if _kept is None:
        libc = _glibc()
        # trim only when more than 2 GB (mallopt's int limit) lies free at the top of the heap
        _kept = libc is not None and bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _kept


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc's; musl has neither)
        return libc
    except (OSError, AttributeError):
        return None


def allocator() -> str:
    """What a run records of the allocator (its peak RSS and speed depend on it)."""
    return "glibc, freed memory kept" if _kept else "system default"


class PeakMemory:
    """Peak memory of a block: CUDA max allocated on GPU, process peak RSS (VmHWM) on CPU.

    Writing 5 to /proc/self/clear_refs resets the kernel's RSS high-water mark, so the CPU
    figure covers only the block, not model loading before it (with :func:`keep_freed_memory`,
    memory freed before the block is first returned to the system, so it does not count either).
    """

    def __init__(self, device: str):
        self.device = device
        self.kind = "cuda_max_allocated" if device.startswith("cuda") else "rss"

    def __enter__(self):
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            if _kept:  # memory freed before the block, and kept, would otherwise count in its peak
                _glibc().malloc_trim(0)
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.kind = "rss_process_lifetime"  # no reset possible: report the lifetime peak
        return self

    def __exit__(self, *exc):
        return False

    def peak_bytes(self) -> int:
        if self.kind == "cuda_max_allocated":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
