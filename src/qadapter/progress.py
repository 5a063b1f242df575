"""Progress of long stages: a rich bar on a terminal, plain log lines otherwise (``make demo > log``,
CI), nothing when disabled (non-main ranks, tests). The time left comes from the measured time per
unit since the stage started, not from a short window that a 30-second step leaves empty."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _now() -> float:
    return time.perf_counter()


@dataclass
class _Task:
    description: str
    total: int
    completed: int
    status: str = ""
    first: int = field(init=False)  # units already done when the stage started (resume)
    started: float = field(default_factory=lambda: _now())  # looked up per call, so tests can set the clock
    printed: float = field(default_factory=lambda: _now())

    def __post_init__(self) -> None:
        self.first = self.completed

    def seconds_per_unit(self) -> float | None:
        done = self.completed - self.first
        return (_now() - self.started) / done if done > 0 else None

    def line(self) -> str:
        per = self.seconds_per_unit()
        pace = f", {per:.1f} s each, time left ≈ {_clock(per * (self.total - self.completed))}" if per is not None else ""
        return f"{self.description}: {self.completed}/{self.total}{pace}" + (f"  {self.status}" if self.status else "")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


class Progress:
    """``enabled=False``: silent. Otherwise a rich bar when ``terminal`` (default: stdout is a TTY),
    else a plain line through ``log`` every ``every_seconds`` and when a stage ends."""

    def __init__(self, enabled: bool, *, terminal: bool | None = None, every_seconds: float = 30.0, log: Callable[[str], None] = print) -> None:
        self.enabled = enabled
        self.every_seconds = every_seconds
        self.log = log
        self._tasks: dict[int, _Task] = {}
        self._bar = None
        if enabled and (sys.stdout.isatty() if terminal is None else terminal):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[left]}  {task.fields[status]}")
            )

    def __enter__(self) -> "Progress":
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def add(self, description: str, total: int, completed: int = 0) -> Any:
        if not self.enabled:
            return None
        key = self._bar.add_task(description, total=total, completed=completed, status="", left="") if self._bar else len(self._tasks)
        self._tasks[key] = _Task(description, total, completed)
        return key

    def advance(self, task: Any, n: int) -> None:
        if task in self._tasks:
            self._show(task, self._tasks[task].completed + n, None)

    def update(self, task: Any, completed: int, status: str) -> None:
        if task in self._tasks:
            self._show(task, completed, status)

    def remove(self, task: Any) -> None:
        state = self._tasks.pop(task, None)
        if state is None:
            return
        if self._bar is not None:
            self._bar.remove_task(task)
        else:
            self.log(f"{state.description}: done, {state.completed}/{state.total} in {_clock(_now() - state.started)}")

    def _show(self, task: Any, completed: int, status: str | None) -> None:
        state = self._tasks[task]
        state.completed = completed
        if status is not None:
            state.status = status
        if self._bar is not None:
            per = state.seconds_per_unit()
            left = f"eta {_clock(per * (state.total - completed))}" if per is not None else ""
            self._bar.update(task, completed=completed, status=state.status, left=left)
        elif _now() - state.printed >= self.every_seconds or completed >= state.total:
            state.printed = _now()
            self.log(state.line())
