"""Peak memory of a block of work: what a run records as its memory cost, and what benchmarks measure."""

from __future__ import annotations

import resource

import torch


class PeakMemory:
    """Peak memory of a block: CUDA max allocated on GPU, process peak RSS (VmHWM) on CPU.

    Writing 5 to /proc/self/clear_refs resets the kernel's RSS high-water mark, so the CPU
    figure covers only the block, not model loading before it.
    """

    def __init__(self, device: str):
        self.device = device
        self.kind = "cuda_max_allocated" if device.startswith("cuda") else "rss"

    def __enter__(self):
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
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
