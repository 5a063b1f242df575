"""Experiment trackers (TensorBoard, Weights & Biases, …) through accelerate: which ones a run reports
to, what it sends them, and where their local files go (``LOGS`` in the run folder).

Q-Adapter's own loop logs through its Accelerator; the TRL peers pass the same names to TRL's
``report_to``. Nothing here imports a tracker: accelerate and transformers do, when one is asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from .config import is_number
from .errors import ConfigError

LOGS = "logs"  # the run folder's entry holding the trackers' local files
PROJECT = "qadapter"  # the run name trackers file Q-Adapter's logs under (TensorBoard: LOGS/qadapter/)
NONE = "none"


def trackers(report_to: str | Sequence[str]) -> list[str]:
    """``report_to`` ("none", "all", or accelerate's tracker names, comma-separated or as a list) → the
    names to log with ([] for none). An unknown name, or one whose package is missing, is refused:
    accelerate would silently log nothing."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    parts = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [name.strip() for part in parts for name in part.split(",") if name.strip() and name.strip() != NONE]
    known = LoggerType.list()
    installed = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ConfigError(f"report_to: unknown tracker {name!r}; choose {NONE}, {', '.join(known)} (comma-separated)")
        if name != LoggerType.ALL.value and name not in installed:
            raise ConfigError(f"report_to: {name} is not installed (pip install {name})")
    return list(dict.fromkeys(names))


def hyperparameters(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as trackers store them: TensorBoard's hparams take only numbers, strings and booleans,
    so a list (``target_modules``) becomes its comma-separated names."""
    return {key: ",".join(map(str, value)) if isinstance(value, list) else value for key, value in settings.items()}


def scalars(entry: dict[str, Any]) -> dict[str, float]:
    """A training-history entry as tracker scalars: the training window's means under ``train/``, a
    held-out evaluation under ``eval/``. Values skipped as non-finite (None) are left out."""
    values, prefix = (entry["eval"], "eval/") if "eval" in entry else (entry, "train/")
    return {prefix + key: value for key, value in values.items() if key != "step" and is_number(value)}


@contextlib.contextmanager
def tracked(accelerator: Any, settings: dict[str, Any]) -> Iterator[None]:
    """Start the accelerator's trackers (none unless it was made with ``log_with``) with the run's
    settings, and finish them (files flushed and closed) on leaving. Not ``accelerator.end_training()``:
    that also ends the process group, which an experiment still needs for training its peers."""
    accelerator.init_trackers(PROJECT, config=hyperparameters(settings))
    try:
        yield
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()
