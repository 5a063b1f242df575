"""The run folder: --overwrite never deletes what qadapter did not write, replaces a run only once the
new one has a checkpoint, one writer per folder whatever its name, no leftovers after kills."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qadapter.errors import ConfigError
from qadapter.run_folder import MARKER, claimed, exclusive

from conftest import marker_records

TRAIN = ["--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "2", "--max-length", "48", "--max-prompt-length", "24", "--no-progress"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in marker_records(12)) + "\n")
    return path


def qadapter(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "qadapter", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def train(model: Path, data: Path, output: Path | str, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return qadapter("train", "--model", str(model), "--data", str(data), "--output", str(output), *TRAIN, *extra, cwd=cwd)


def one_line_error(done: subprocess.CompletedProcess, pattern: str) -> None:
    import re

    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and re.search(pattern, lines[0]), done.stderr


def test_overwrite_refuses_a_folder_of_the_users_files(tiny_model_dir, pairs, tmp_path):
    folder = tmp_path / "mine"
    (folder / "photos").mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    one_line_error(train(tiny_model_dir, pairs, folder, "--overwrite"), "holds 'photos', which qadapter did not write")
    assert (folder / "thesis.tex").read_text() == "years of work" and (folder / "photos").is_dir()


@pytest.mark.parametrize("where", ["root", "home", "cwd", "parent"])
def test_overwrite_refuses_root_home_and_the_working_folder(tiny_model_dir, pairs, tmp_path, where):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / MARKER).write_text("{}")  # even a folder marked as a run
    target = {"root": "/", "home": str(Path.home()), "cwd": ".", "parent": ".."}[where]
    message = "the root or the home folder" if where in ("root", "home") else "the working folder or a folder above it"
    one_line_error(train(tiny_model_dir, pairs, target, "--overwrite", cwd=work), message)
    assert (work / MARKER).is_file()


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_to_start(tiny_model_dir, pairs, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_model_dir, pairs, run).returncode == 0
    before = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    failed = train(tmp_path / "no-such-model", pairs, run, "--overwrite")
    assert failed.returncode == 2
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing set aside, no lock left


def test_overwrite_replaces_a_run_and_leaves_nothing_beside_it(tiny_model_dir, pairs, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_model_dir, pairs, run).returncode == 0
    (run / "metrics.json").write_text("{}")  # marks the old run, to see it replaced
    assert train(tiny_model_dir, pairs, run, "--overwrite", "--learning-rate", "2e-3").returncode == 0
    assert json.loads((run / "metrics.json").read_text())["config"]["learning_rate"] == 2e-3
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_run_written_before_the_marker_can_be_overwritten(tiny_model_dir, pairs, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_model_dir, pairs, run).returncode == 0
    (run / MARKER).unlink()
    assert train(tiny_model_dir, pairs, run, "--overwrite").returncode == 0


def test_one_lock_for_every_name_of_a_folder(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with exclusive(tmp_path / "real"):
        with pytest.raises(ConfigError, match="in use by another training run"):
            with exclusive(tmp_path / "link"):
                pass
    assert not (tmp_path / ".real.lock").exists()  # removed with its run
    with exclusive(tmp_path / "link"):  # free again
        pass


def test_leftovers_of_killed_saves_are_removed_when_the_folder_is_next_claimed(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".step-000004.tmp-abc").mkdir(parents=True)
    (run / ".adapter.tmp-xyz").mkdir()
    (run / ".metrics.json.tmp-1").write_text("{")
    (run / MARKER).write_text("{}")
    with claimed(run, resume=True, overwrite=False):
        pass
    assert sorted(p.name for p in run.rglob("*")) == [MARKER, "checkpoints"]


def test_an_interrupted_overwrite_brings_the_old_run_back(tmp_path):
    """Killed after setting the old run aside and before the new one's first checkpoint."""
    run, aside = tmp_path / "run", tmp_path / ".run.replaced"
    (aside / "adapter").mkdir(parents=True)
    (aside / MARKER).write_text("{}")
    run.mkdir()
    (run / MARKER).write_text("{}")  # the new run's start, nothing else
    with claimed(run, resume=True, overwrite=False):
        pass
    assert (run / "adapter").is_dir() and not aside.exists()


def test_no_leftovers_are_looked_for_in_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / ".draft.tmp-1").write_text("the user's")
    (folder / "notes.txt").write_text("x")
    with exclusive(folder):
        pass
    assert (folder / ".draft.tmp-1").read_text() == "the user's"


def test_output_that_is_a_file_is_one_line(tiny_model_dir, pairs, tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(train(tiny_model_dir, pairs, tmp_path / "file"), "exists and is not a folder")


def test_output_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ConfigError, match="cannot create .*Read-only file system"):
        with exclusive(tmp_path / "a" / "run"):
            pass
