"""Where to compute and in which precision, decided from what the hardware really supports."""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

MixedPrecision = Literal["no", "bf16", "fp16"]  # "no": float32 throughout

# Scoring runs in float32 unless asked otherwise: bf16 moves continuation log-likelihoods of the
# bundled model by 0.1–0.3 nats, more than the gap between the two best answers of many items, so
# the same experiment would give other numbers on a CPU with native bf16 than on one without.
EVAL_PRECISION: MixedPrecision = "no"

# What "auto" resolves to can be forced, to run the tests as a machine of another kind would
# (e.g. QADAPTER_AUTO_PRECISION=bf16 on a CPU without native bf16).
AUTO_PRECISION_ENV = "QADAPTER_AUTO_PRECISION"
_NAMES = {"no": "no", "float32": "no", "fp32": "no", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}


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
    """``auto``: bf16 where the device has it natively (CUDA with bf16, CPUs with AVX-512 BF16/AMX),
    else full precision; ``no``/``float32``, ``bf16``/``bfloat16`` and ``fp16``/``float16`` as named."""
    if requested in _NAMES:
        return _NAMES[requested]  # type: ignore[return-value]
    if requested != "auto":
        raise ValueError(f"precision must be 'auto', 'no' (float32), 'bf16' or 'fp16', got {requested!r}")
    forced = os.environ.get(AUTO_PRECISION_ENV)
    if forced:
        if forced not in _NAMES:
            raise ValueError(f"{AUTO_PRECISION_ENV}={forced!r}: expected no, bf16 or fp16")
        return _NAMES[forced]  # type: ignore[return-value]
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "no"
    return "no"


def autocast(device: torch.device, precision: MixedPrecision):
    """An autocast context for inference passes in the chosen precision (a no-op for 'no')."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def precision_name(precision: MixedPrecision) -> str:
    """How results record a precision: ``float32``, ``bf16`` or ``fp16``."""
    return "float32" if precision == "no" else precision


def release_accelerator_precision() -> None:
    """Let the next ``Accelerator`` pick its own mixed precision. accelerate keeps one per process and
    refuses another, so without this a second training in one process (a notebook, an experiment, a
    test) could not switch between float32 and bf16. The process group (``PartialState``) is kept;
    transformers' Trainer resets the state the same way between hyper-parameter trials."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
