"""The run folder's life: one writer at a time, and nothing of the user's ever deleted.

A run folder (``qadapter train --output DIR``) holds ``adapter/``, ``checkpoints/``, ``metrics.json``,
the trackers' ``logs/`` and the marker ``.qadapter-run``, written when qadapter creates the folder.
``--overwrite`` replaces only such a folder (or one holding nothing but those entries, as runs written before the marker
existed do), never ``/``, the home folder, the working folder or a folder above it; and it replaces
it only once the new run has written its first checkpoint: until then the old run waits beside it,
under a hidden name, and comes back if the new run fails.

While a run writes, it holds an exclusive lock keyed on the folder's resolved path (two names of one
folder, e.g. through a symlink, share it). Holding the lock also proves that leftovers of a killed
writer (hidden ``.*.tmp-*`` / ``.*.old-*`` folders of interrupted atomic saves, an old run set aside
by an interrupted ``--overwrite``) have no owner, so they are cleaned up then.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from . import __version__
from .errors import ConfigError
from .tracking import LOGS

MARKER = ".qadapter-run"
RUN_ENTRIES = frozenset({"adapter", "checkpoints", "metrics.json", LOGS, MARKER})
STALE_PATTERNS = (".*.tmp-*", ".*.old-*")  # what atomic saves leave when killed mid-way


def _lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def _set_aside_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.replaced"


@contextlib.contextmanager
def exclusive(output: Path) -> Iterator[Path]:
    """Lock the resolved ``output`` for as long as a run writes into it; yields the resolved path.
    The lock file is removed on exit, so no ``.NAME.lock`` outlives its run."""
    folder = output.resolve()
    if folder == Path(folder.anchor) or folder == Path.home().resolve():
        raise ConfigError(f"--output {output}: refusing to use {folder} as a run folder (the root or the home folder)")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--output {output}: cannot create {folder.parent} ({exc.strerror})") from None
    lock = _lock_path(folder)
    while True:
        try:
            handle: IO[str] = open(lock, "a")
        except OSError as exc:
            raise ConfigError(f"--output {output}: cannot write in {folder.parent} ({exc.strerror})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ConfigError(f"{output} is in use by another training run") from None
        # The previous holder removes the file on exit: if it did so after we opened it, we hold a lock
        # on a file nobody else will find; take the one that is there now instead.
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino:
                break
        handle.close()
    try:
        _remove_stale(folder)
        yield folder
    finally:
        lock.unlink(missing_ok=True)
        handle.close()


def _remove_stale(folder: Path) -> None:
    """Leftovers of a killed writer of this folder (its lock is ours now, so they have no owner),
    looked for only in folders qadapter made runs of."""
    set_aside = _set_aside_path(folder)
    if set_aside.is_dir():  # an --overwrite was killed before its new run settled
        if _has_progress(folder):
            shutil.rmtree(set_aside)
        else:  # the new run never got going: the old run comes back
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(set_aside, folder)
    if not folder.is_dir() or not _is_run(folder, stale_allowed=True):
        return
    for place in (folder, folder / "checkpoints"):
        for pattern in STALE_PATTERNS:
            for leftover in place.glob(pattern) if place.is_dir() else ():
                shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()


def _has_progress(folder: Path) -> bool:
    return (folder / "adapter").is_dir() or any((folder / "checkpoints").glob("step-*"))


def refuse_dangerous(output: Path) -> None:
    """Refuse to replace ``output`` where it is the root, the home folder, the working folder or a folder above it."""
    folder = output.resolve()
    if folder == Path(folder.anchor) or folder == Path.home().resolve():
        raise ConfigError(f"--output {output}: refusing to replace {folder} (the root or the home folder)")
    _refuse_dangerous(output, folder)


def _refuse_dangerous(output: Path, folder: Path) -> None:
    cwd = Path.cwd().resolve()
    if folder == cwd or folder in cwd.parents:
        raise ConfigError(f"--output {output}: refusing to replace {folder} (the working folder or a folder above it)")


def _is_run(folder: Path, stale_allowed: bool = False) -> bool:
    """Written by qadapter as a run: the marker, or nothing but a run's entries (runs older than the
    marker), with ``stale_allowed`` also the leftovers of interrupted saves."""
    if (folder / MARKER).is_file():
        return True
    return all(e.name in RUN_ENTRIES or stale_allowed and any(e.match(p) for p in STALE_PATTERNS) for e in folder.iterdir())


class RunFolder:
    """A claimed run folder: created (with its marker) or reused for ``--resume``; an old run being
    replaced is kept aside until :meth:`settle` (first checkpoint or the end) and restored if the
    ``with`` block fails before that."""

    def __init__(self, output: Path, folder: Path) -> None:
        self.output = output  # as the user named it, for messages
        self.folder = folder
        self.set_aside: Path | None = None

    def prepare(self, resume: bool, overwrite: bool) -> None:
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--output {self.output}: exists and is not a folder")
        if resume or not folder.exists() or not any(folder.iterdir()):
            self._create()
            return
        if not overwrite:
            raise ConfigError(f"{self.output} already holds a run: resume it (--resume) or replace it (--overwrite)")
        _refuse_dangerous(self.output, folder)
        if not _is_run(folder):
            stranger = next(e.name for e in sorted(folder.iterdir()) if e.name not in RUN_ENTRIES)
            raise ConfigError(
                f"--output {self.output}: holds {stranger!r}, which qadapter did not write; --overwrite only replaces run folders "
                "qadapter created: choose another --output"
            )
        self.set_aside = _set_aside_path(folder)
        os.replace(folder, self.set_aside)
        self._create()

    def _create(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            marker = self.folder / MARKER
            if not marker.exists():
                marker.write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "qadapter_version": __version__}) + "\n")
        except OSError as exc:
            raise ConfigError(f"--output {self.output}: cannot write there ({exc.strerror})") from None

    def settle(self) -> None:
        """The new run has a checkpoint (or finished): the run it replaces can go."""
        if self.set_aside is not None:
            shutil.rmtree(self.set_aside)
            self.set_aside = None

    def restore(self) -> None:
        """The new run failed before its first checkpoint: put the old run back."""
        if self.set_aside is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            os.replace(self.set_aside, self.folder)
            self.set_aside = None


@contextlib.contextmanager
def claimed(output: str | Path, *, resume: bool, overwrite: bool) -> Iterator[RunFolder]:
    """Lock, clean and prepare the run folder ``output``; on leaving, settle a replacement if the run
    got as far as a checkpoint, else restore what it replaced."""
    output = Path(output)
    with exclusive(output) as folder:
        run = RunFolder(output, folder)
        run.prepare(resume, overwrite)
        try:
            yield run
        except BaseException:
            if _has_progress(folder):
                run.settle()
            else:
                run.restore()
            raise
        run.settle()
