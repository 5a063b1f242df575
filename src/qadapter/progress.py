"""A rich progress display with time remaining, or nothing at all when disabled (non-main ranks, tests)."""

from __future__ import annotations

from typing import Any


class Progress:
    """A rich progress display with time remaining, or nothing when disabled (non-main ranks, tests)."""

    def __init__(self, enabled: bool) -> None:
        self._progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
            )

    def __enter__(self) -> "Progress":
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def add(self, description: str, total: int, completed: int = 0) -> Any:
        return self._progress.add_task(description, total=total, completed=completed, status="") if self._progress else None

    def advance(self, task: Any, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(task, n)

    def update(self, task: Any, completed: int, status: str) -> None:
        if self._progress is not None:
            self._progress.update(task, completed=completed, status=status)

    def remove(self, task: Any) -> None:
        if self._progress is not None:
            self._progress.remove_task(task)
