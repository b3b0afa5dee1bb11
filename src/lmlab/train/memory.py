"""Peak memory of a run: CUDA allocator peaks on GPU, the process's peak resident set on CPU.

On Linux the kernel's peak-RSS counter (VmHWM) can be reset by writing 5 to
/proc/self/clear_refs, so several runs in one process (tests, the preflight) each get their own
peak rather than the process's lifetime maximum.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class MemoryPeak:
    peak_bytes: int  # the figure budgets are checked against: allocated on CUDA, RSS on CPU
    reserved_bytes: int | None = None  # CUDA only: the caching allocator's peak reservation
    kind: str = "rss"  # "cuda_allocated" | "rss"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Not Linux, or not permitted: ru_maxrss (read_peak's fallback) is then the lifetime peak.
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")


def _peak_rss_bytes() -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def read_peak(device: torch.device) -> MemoryPeak:
    if device.type == "cuda":
        return MemoryPeak(
            peak_bytes=torch.cuda.max_memory_allocated(device),
            reserved_bytes=torch.cuda.max_memory_reserved(device),
            kind="cuda_allocated",
        )
    return MemoryPeak(peak_bytes=_peak_rss_bytes(), kind="rss")
