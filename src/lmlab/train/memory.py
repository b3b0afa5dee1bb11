"""Peak memory of a run: CUDA allocator peaks on GPU, the process's peak resident set on CPU.

On Linux the kernel's peak-RSS counter (VmHWM) can be reset by writing 5 to
/proc/self/clear_refs, so several runs in one process (tests, the preflight) each get their own
peak rather than the process's lifetime maximum.

:func:`keep_freed_memory` is the one allocator setting lmlab makes on CPU (the role jemalloc or
tcmalloc play in Intel's PyTorch CPU tuning guide): glibc hands each freed block above its mmap
threshold back to the kernel, so every training step faults its activations in again, page by
page, zero-filled. Measured at 4 layers x 256, seq 256, batch 16 (one thread): 26k page faults
and 0.067 s of system time per step before, 2k and 0.006 s after. The price is a fragmented
heap, which can raise the peak resident set: in ``tests/test_systems.py``'s memory experiment it
hid most of what activation checkpointing saves (11 MiB of ~35 MiB). So an experiment that
measures memory (the Memory / Systems addendum) trains with the allocator as glibc ships it: its
workers set ``LMLAB_KEEP_FREED_MEMORY=0`` (``lmlab.execute.worker``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
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


# glibc's mallopt parameters (malloc.h) and the values set: blocks up to 32 MiB (the most glibc
# allows) come from the heap, and up to 1 GiB of freed heap stays with the process.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_ENV = "LMLAB_KEEP_FREED_MEMORY"
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 32 * 2**20, 2**30


def keep_freed_memory(device: torch.device) -> bool:
    """On a CPU run under glibc, keep freed memory for the next step instead of returning it to
    the kernel (see the module docstring), unless ``LMLAB_KEEP_FREED_MEMORY=0``. Returns whether
    it was set."""
    if device.type != "cpu" or not sys.platform.startswith("linux") or \
            os.environ.get(KEEP_FREED_ENV) == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                    and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, say): nothing to tune
        return False


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
