"""Model FLOPs utilisation: the model's training FLOPs per second over the device's peak.

FLOPs per token come from the model's shape (:meth:`lmlab.model.gpt.GPT.flops_per_token`: 6N for
the weight matmuls plus the attention scores, PaLM appendix B). The peak comes from the table
below: dense (no sparsity) tensor-core throughput from NVIDIA's datasheets, in TFLOP/s, keyed by
a fragment of ``torch.cuda.get_device_name()`` and the precision the matmuls run in:

- ``bf16`` / ``fp16``: ``train.precision`` bf16 / fp16 (autocast);
- ``tf32``: fp32 with ``train.tf32`` on (matmuls on tensor cores);
- ``fp32``: fp32 with ``train.tf32`` off.

The first matching fragment wins, so more specific names come first (H100 PCIe before H100). A
device not in the table, and every CPU, has no MFU: lmlab logs none rather than a guess.
``LMLAB_PEAK_TFLOPS`` overrides the table (the peak of this machine, at the run's precision).
"""

from __future__ import annotations

import os

import torch

# fragment -> {precision: dense peak TFLOP/s}
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),  # SXM5
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10G", {}),  # AWS's A10 variant: no public datasheet, so no MFU rather than A10's figures
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),  # no bf16 or tf32 on Volta
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
)


def matmul_precision(precision: str, tf32: bool) -> str:
    """The table's precision key for a run's ``train.precision`` and ``train.tf32``."""
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if tf32 else "fp32"


def lookup_peak(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of ``device_name`` at ``precision`` (a ``matmul_precision`` key), or None."""
    for fragment, peaks in PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            tflops = peaks.get(precision)
            return None if tflops is None else tflops * 1e12
    return None


def peak_flops(device: torch.device, precision: str, tf32: bool) -> float | None:
    """The peak FLOP/s MFU is measured against on ``device``, or None when unknown."""
    override = os.environ.get("LMLAB_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device.type != "cuda":
        return None
    return lookup_peak(torch.cuda.get_device_name(device), matmul_precision(precision, tf32))
