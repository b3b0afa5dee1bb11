"""Where, when and with what a run ran: captured from the machine, never typed by hand.

The template's date, commit hash / branch and hardware lines are filled from this record, and
two runs whose records disagree on hardware or package versions are visibly not comparable.
The record is a flat dict of JSON values so the report can diff records across runs key by key.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# A hung git (a lock, a network file system) must not stall a run's start.
GIT_TIMEOUT_S = 10.0

_PACKAGES = ("torch", "lmlab", "numpy", "tokenizers")


def capture(repo_dir: Path | str | None = None) -> dict[str, Any]:
    """The provenance record of this process, for the git repository containing ``repo_dir``
    (default: the current directory). Anything that cannot be found is None, never an error."""
    prov: dict[str, Any] = {
        "captured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **_git(Path(repo_dir) if repo_dir is not None else Path.cwd()),
        "python_version": platform.python_version(),
        "python_executable": sys.executable,
    }
    for package in _PACKAGES:
        prov[f"{package}_version"] = _package_version(package)
    prov.update(_hardware())
    prov["hostname"] = socket.gethostname()
    prov["os"] = platform.platform()
    return prov


def hardware_summary(prov: Mapping[str, Any]) -> str:
    """One line for the template's hardware field: "1× NVIDIA H100 80GB HBM3" when the run had
    GPUs, else the CPU model with its logical cores, "Intel(R) Xeon(R) ... (CPU, 2 logical
    cores)" (a count of cores, not of processors: "2× Xeon" would read as two CPUs), and how
    many of them the run could use when that was fewer (a container, taskset)."""
    gpus = [name for name in prov.get("gpu_names") or [] if name]
    if gpus:
        # Mixed cards are rare but possible; list each model with its own count.
        return ", ".join(f"{n}× {name}" for name, n in Counter(gpus).items())
    cpu = prov.get("cpu_model") or "unknown CPU"
    count, usable = prov.get("cpu_count"), prov.get("cpu_count_usable")
    if not count:
        return f"{cpu} (CPU)"
    cores = f"{count} logical core{'s' if count != 1 else ''}"
    if usable and usable < count:
        cores = f"{usable} of {cores} usable"
    return f"{cpu} (CPU, {cores})"


def _git(repo_dir: Path) -> dict[str, Any]:
    if repo_dir.is_file():
        repo_dir = repo_dir.parent
    # Dirty counts modified tracked files only: untracked scratch files (outputs, notebooks)
    # would otherwise mark every run dirty and make the flag meaningless.
    commit = _run_git(repo_dir, "rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_branch": None, "git_dirty": None, "git_root": None}
    branch = _run_git(repo_dir, "rev-parse", "--abbrev-ref", "HEAD")
    status = _run_git(repo_dir, "status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": commit,
        # A detached HEAD has no branch; "HEAD" would read like a branch name in the report.
        "git_branch": None if branch in (None, "HEAD") else branch,
        "git_dirty": None if status is None else bool(status),
        "git_root": _run_git(repo_dir, "rev-parse", "--show-toplevel"),
    }


def _run_git(repo_dir: Path, *args: str) -> str | None:
    """Stripped stdout of one git command, or None when git is missing, fails or hangs."""
    try:
        done = subprocess.run(
            ["git", "-C", str(repo_dir), *args], capture_output=True, text=True,
            timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _package_version(name: str) -> str | None:
    # Installed metadata rather than importing the package: tokenizers need not be loaded
    # for a run that does not use it.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        # The cores this process may use (a container or taskset can allow fewer).
        "cpu_count_usable": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                             else os.cpu_count()),
        "torch_threads": None,
        "gpu_count": 0,
        "gpu_names": [],
        "gpu_memory_gb": [],
        "cuda_version": None,
        "cudnn_version": None,
    }
    try:
        import torch
    except ImportError:
        return info
    info["torch_threads"] = torch.get_num_threads()
    info["cuda_version"] = torch.version.cuda
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        props = [torch.cuda.get_device_properties(i) for i in range(count)]
        info["gpu_count"] = count
        info["gpu_names"] = [p.name for p in props]
        info["gpu_memory_gb"] = [round(p.total_memory / 2**30, 1) for p in props]
        info["cudnn_version"] = torch.backends.cudnn.version()
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                # x86 says "model name"; some ARM kernels only give "Hardware" or "Model".
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5, check=False)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or None
