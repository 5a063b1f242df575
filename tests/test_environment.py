"""The environment record beside every result: versions, source revision, hardware, date."""

from __future__ import annotations

import subprocess

import torch

from qadapter import __version__, environment


def _git(folder, *args):
    subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True)


def test_record_names_versions_hardware_and_precision():
    env = environment.record("float32")
    assert env["versions"]["qadapter"] == __version__ and env["versions"]["torch"] == torch.__version__
    assert env["precision"] == "float32" and env["hardware"]["cpu"]["cores"] >= 1
    assert set(env["hardware"]["cpu"]["flags"]) <= set(environment.CPU_FLAGS)
    assert env["date"].endswith("+00:00")  # UTC
    assert "precision" not in environment.record()


def test_git_revision_of_a_checkout_and_its_uncommitted_changes(tmp_path):
    assert environment.git_revision(tmp_path) is None  # not a checkout
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    assert environment.git_revision(repo) == {"commit": head, "dirty": False}
    (repo / "a.py").write_text("x = 2\n")
    environment.git_revision.cache_clear()
    assert environment.git_revision(repo) == {"commit": head, "dirty": True}


def test_describe_is_one_line_naming_the_source_and_machine():
    env = environment.record("bf16")
    line = environment.describe(env)
    assert "\n" not in line and f"qadapter {__version__}" in line and "precision bf16" in line and f"torch {torch.__version__}" in line
    assert environment.describe(None) == ""
