"""Where to compute and in which precision, decided from what the hardware really supports."""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

MixedPrecision = Literal["no", "bf16", "fp16"]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True if the CPU computes bfloat16 natively (AVX-512 BF16 or AMX).

    Without it, bf16 autocast on the CPU is emulated and several times slower than float32.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def choose_mixed_precision(device: torch.device, requested: str = "auto") -> MixedPrecision:
    """``auto``: bf16 where the device has it natively (CUDA with bf16, CPUs with AVX-512 BF16/AMX), else full precision."""
    if requested in ("no", "bf16", "fp16"):
        return requested  # type: ignore[return-value]
    if requested != "auto":
        raise ValueError(f"mixed precision must be 'auto', 'no', 'bf16' or 'fp16', got {requested!r}")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "no"
    return "no"


def autocast(device: torch.device, precision: MixedPrecision):
    """An autocast context for inference passes in the chosen precision (a no-op for 'no')."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
