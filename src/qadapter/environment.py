"""What produced a result: library versions, source revision, hardware and date, recorded beside every
``metrics.json`` and ``results.json`` (as lm-eval does), so a number can be traced to the machine and
code that measured it."""

from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
SOURCE = Path(__file__).resolve().parent
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones that decide float32/bf16 speed


def record(precision: str | None = None) -> dict[str, Any]:
    """The environment now: date (UTC), versions, git revision of the source (if it is a checkout),
    CPU/GPU, and the numeric precision the result was computed in (when given)."""
    from . import __version__

    versions = {"qadapter": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "git": git_revision(SOURCE),
        "hardware": hardware(),
        **({"precision": precision} if precision is not None else {}),
    }


@functools.cache
def git_revision(source: Path) -> dict[str, Any] | None:
    """The commit of the checkout ``source`` lies in (qadapter's own source by default), and whether it
    has uncommitted changes to tracked files; None outside a checkout (an installed wheel) or without git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


@functools.cache
def hardware() -> dict[str, Any]:
    """CPU model, cores and the flags that decide bf16 speed; the GPUs torch sees."""
    import torch

    cpu = {"model": platform.processor() or platform.machine(), "cores": os.cpu_count(), "flags": []}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        cpu.update(model=model or cpu["model"], flags=[f for f in CPU_FLAGS if f in flags])
    except OSError:  # not Linux
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"platform": platform.platform(), "cpu": cpu, "gpus": gpus, "torch_threads": torch.get_num_threads()}


def describe(env: dict[str, Any] | None) -> str:
    """One line of a report saying what produced it ("" without a record)."""
    if not env:
        return ""
    v, git, cpu = env["versions"], env.get("git"), env["hardware"]["cpu"]
    source = f"commit {git['commit'][:10]}{' with uncommitted changes' if git['dirty'] else ''}" if git else "an installed package"
    device = ", ".join(env["hardware"]["gpus"]) or f"{cpu['model']} ({cpu['cores']} cores{', ' + ' '.join(cpu['flags']) if cpu['flags'] else ''})"
    precision = f", precision {env['precision']}" if env.get("precision") else ""
    return f"Produced {env['date']} by qadapter {v['qadapter']} ({source}), torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, on {device}{precision}."
