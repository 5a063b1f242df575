"""Progress without a terminal: plain lines with the time left from measured times per unit."""

from __future__ import annotations

import pytest

from qadapter import progress as progress_module
from qadapter.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress_module, "_now", fake)
    return fake


def test_plain_lines_every_interval_with_time_left_from_measured_steps(clock):
    lines: list[str] = []
    with Progress(True, terminal=False, every_seconds=60, log=lines.append) as bar:
        task = bar.add("train", total=100, completed=20)  # resumed at step 20: only steps run here count
        for step in range(21, 101):
            clock.now += 30.0  # 30 s per step
            bar.update(task, step, f"loss {1 / step:.3f}")
    assert len(lines) == 80 * 30 // 60  # every other step, the last one included
    assert lines[0] == "train: 22/100, 30.0 s each, time left ≈ 39:00  loss 0.045"
    assert lines[-1].startswith("train: 100/100, 30.0 s each, time left ≈ 0:00")


def test_advance_and_remove_report_the_stage(clock):
    lines: list[str] = []
    bar = Progress(True, terminal=False, every_seconds=1e9, log=lines.append)
    task = bar.add("eval (before)", total=10)
    clock.now = 5.0
    bar.advance(task, 4)
    assert lines == []  # not yet due
    clock.now = 12.0
    bar.advance(task, 6)  # the end is always shown
    bar.remove(task)
    assert lines == ["eval (before): 10/10, 1.2 s each, time left ≈ 0:00", "eval (before): done, 10/10 in 0:12"]


def test_disabled_progress_is_silent(clock):
    lines: list[str] = []
    bar = Progress(False, terminal=False, log=lines.append)
    task = bar.add("train", total=3)
    bar.update(task, 3, "x")
    bar.remove(task)
    assert task is None and lines == []


def test_terminal_bar_shows_the_measured_time_left(clock):
    bar = Progress(True, terminal=True)
    with bar:
        task = bar.add("train", total=10)
        clock.now = 20.0
        bar.update(task, 2, "")
        assert bar._bar.tasks[0].fields["left"] == "eta 1:20"
