"""Runs that are killed, interrupted or split over processes end with the same adapter as one clean run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ShellPayload, marker_records

SETTINGS = ["--batch-size", "8", "--micro-batch-size", "2", "--learning-rate", "5e-3", "--warmup-ratio", "0",
            "--max-length", "48", "--max-prompt-length", "24", "--eval-fraction", "0.25", "--no-progress"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in marker_records(40)) + "\n")
    return path


def _env() -> dict[str, str]:
    # one thread per process: two workers on two cores must not spin-wait on each other
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _train_cmd(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qadapter", "train", "--model", str(model), "--data", str(data), "--output", str(output), *SETTINGS, *extra]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tol)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_then_resume_matches_uninterrupted(tiny_model_dir, data_file, tmp_path):
    """SIGKILL mid-run, resume from the last checkpoint: same final adapter as an uninterrupted run (dropout on)."""
    extra = ["--max-steps", "10", "--save-every", "2", "--eval-every", "100"]
    clean = subprocess.run(_train_cmd(tiny_model_dir, data_file, tmp_path / "clean", *extra), env=_env(), capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(tiny_model_dir, data_file, killed, *extra), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(killed / "checkpoints" / "step-000004", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists()  # it really died before the end
    for leftover in (killed / "checkpoints").iterdir():  # a kill during a save leaves only a temp folder
        assert leftover.name.startswith(("step-", ".step-"))
    resumed = subprocess.run(_train_cmd(tiny_model_dir, data_file, killed, *extra, "--resume"), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout  # progress and notices go to stdout, errors to stderr
    _assert_same_adapter(_adapter(tmp_path / "clean"), _adapter(killed), rtol=1e-5, atol=1e-7)


def test_sigint_stops_at_step_boundary_with_resume_command(tiny_model_dir, data_file, tmp_path):
    """Ctrl-C writes a checkpoint at the next step boundary, exits 130 and prints the command that resumes."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(tiny_model_dir, data_file, out, "--max-steps", "400", "--save-every", "1000", "--eval-every", "1000"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while "time left" not in (line := proc.stdout.readline()):  # training has started once the estimate is printed
        assert line or proc.poll() is None, "training ended early"
        assert time.monotonic() < deadline
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "qadapter train" in err
    checkpoints = list((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.pt").is_file()


def test_two_processes_match_one(tiny_model_dir, data_file, tmp_path):
    """`--num-processes 2` (accelerate launch, gloo on CPU) ends with the adapter of one process with the same global batch.

    In float32 whatever the machine: one process runs each prompt once (a KV cache serves chosen and rejected),
    two run whole rows (DDP must see every forward), and in bf16 those two equal computations round
    differently, which Adam's first steps amplify in near-zero gradients beyond any useful tolerance."""
    extra = ["--max-steps", "3", "--lora-dropout", "0", "--eval-every", "100", "--mixed-precision", "no"]
    one = subprocess.run(_train_cmd(tiny_model_dir, data_file, tmp_path / "one", *extra), env=_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(_train_cmd(tiny_model_dir, data_file, tmp_path / "two", *extra, "--num-processes", "2"), env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert two.stdout.count("training pairs") == 1  # only rank 0 reports
    _assert_same_adapter(_adapter(tmp_path / "one"), _adapter(tmp_path / "two"), rtol=1e-4, atol=1e-6)


def test_resume_refuses_a_checkpoint_that_carries_code(tiny_model_dir, data_file, tmp_path):
    """`--resume` on a trainer_state.pt with a planted os.system call exits 2 with one line naming the file;
    the planted command never runs (the state is read with torch.load(weights_only=True))."""
    run, marker = tmp_path / "run", tmp_path / "code-ran"
    extra = ["--max-steps", "4", "--save-every", "2", "--eval-every", "100"]
    first = subprocess.run(_train_cmd(tiny_model_dir, data_file, run, *extra), env=_env(), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    state_path = run / "checkpoints" / "step-000002" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    torch.save({**state, "rng": ShellPayload(marker)}, state_path)
    env = {**_env(), "COLUMNS": "1000"}
    env.pop("QADAPTER_DEBUG", None)
    resumed = subprocess.run(_train_cmd(tiny_model_dir, data_file, run, *extra, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 2
    error = [line for line in resumed.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"{state_path}: refused: it would call or build" in error[0], resumed.stderr
    assert "Traceback" not in resumed.stderr and not marker.exists()
