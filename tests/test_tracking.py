"""--report-to: Q-Adapter's loop and the TRL peers log to accelerate's / transformers' trackers, tested
offline with TensorBoard on the tiny model; the logs live in the run folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from qadapter import tracking
from qadapter.cli import app
from qadapter.config import QAdapterConfig
from qadapter.data import read_records, split_by_prompt
from qadapter.errors import ConfigError
from qadapter.run_folder import claimed
from qadapter.training import train

from conftest import marker_records

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def quiet(message: str) -> None:
    pass


def scalars(folder) -> dict[str, dict[int, float]]:
    """Every scalar TensorBoard finds in ``folder``'s event files: tag → {step: value}."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in marker_records(20)) + "\n")
    return path


def test_train_reports_its_history_to_tensorboard(tiny_model_dir, data_file, tmp_path):
    """`qadapter train --report-to tensorboard`: the run folder's logs/qadapter/ holds the loss terms, the
    learning rate and the held-out evaluations, at the steps and with the values metrics.json records."""
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out), "--max-steps", "3", "--eval-every", "1"]
    result = CliRunner().invoke(app, [*args, "--no-progress", "--report-to", "tensorboard"])
    assert result.exit_code == 0, result.output
    logged = scalars(out / tracking.LOGS / tracking.PROJECT)
    metrics = json.loads((out / "metrics.json").read_text())
    window = {h["step"]: h for h in metrics["history"] if "loss" in h}
    evals = {h["step"]: h["eval"] for h in metrics["history"] if "eval" in h}
    assert set(window) == set(evals) == {1, 2, 3}
    for key in ("loss", "bt_loss", "penalty", "lr", "rewards/margins"):
        assert logged[f"train/{key}"] == pytest.approx({step: h[key] for step, h in window.items()}, rel=1e-6)
    before = {0: metrics["pref_accuracy_before"]}  # step 0: the evaluation before training
    assert logged["eval/accuracy"] == pytest.approx({**before, **{step: e["accuracy"] for step, e in evals.items()}})


def test_no_tracker_writes_no_logs(tiny_model_dir, data_file, tmp_path):
    """The default, --report-to none: no logs/ folder."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out), "--max-steps", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert not (out / tracking.LOGS).exists()


def test_resuming_may_change_the_trackers(tiny_model_dir, tmp_path):
    """The trackers are a run setting, not the config: a run started without them resumes with TensorBoard."""
    train_records, eval_records = split_by_prompt(read_records(marker_records(12)).records, 0.25)
    kwargs = dict(model=str(tiny_model_dir), progress=False, log=quiet, save_every=1, eval_every=100)
    config = QAdapterConfig(max_steps=2, batch_size=4, micro_batch_size=4)
    train(config, train_records, eval_records, tmp_path / "run", **kwargs)
    (tmp_path / "run" / "metrics.json").unlink()  # the run stopped after its step-1 checkpoint
    shutil.rmtree(tmp_path / "run" / "adapter")
    train(config, train_records, eval_records, tmp_path / "run", resume=True, report_to="tensorboard", **kwargs)
    assert set(scalars(tmp_path / "run" / tracking.LOGS / tracking.PROJECT)["train/loss"]) == {2}


def test_a_run_folder_with_logs_can_be_replaced(tmp_path):
    """logs/ is a run folder's own entry: --overwrite replaces a run holding one (even one without the marker)."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / tracking.LOGS / tracking.PROJECT).mkdir(parents=True)
    with claimed(run, resume=False, overwrite=True):
        pass
    assert not (run / tracking.LOGS).exists()


@pytest.mark.parametrize(
    "report_to, expected",
    [("none", []), ("", []), ("tensorboard", ["tensorboard"]), (" tensorboard, tensorboard ", ["tensorboard"]), (["all"], ["all"])],
)
def test_tracker_names(report_to, expected):
    assert tracking.trackers(report_to) == expected


def test_an_uninstalled_tracker_is_refused(monkeypatch):
    """accelerate would log nothing, silently, for a tracker whose package is missing."""
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ConfigError, match="report_to: tensorboard is not installed"):
        tracking.trackers("tensorboard")


def test_unknown_tracker_is_one_line(data_file, tmp_path):
    """A misspelt tracker stops `qadapter train` before anything is loaded: exit 2, one line naming the option and the name."""
    env = {**os.environ, "COLUMNS": "300", "OMP_NUM_THREADS": "1"}
    env.pop("QADAPTER_DEBUG", None)
    out = tmp_path / "o"
    proc = subprocess.run(
        [sys.executable, "-m", "qadapter", "train", "--data", str(data_file), "--output", str(out), "--report-to", "tensorboard,tensorbord"],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: report_to: unknown tracker 'tensorbord'") and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_peer_reports_to_tensorboard(tiny_model_dir, tmp_path):
    """A TRL peer passes --report-to to TRL: its training loss lands in the peer's logs/."""
    pytest.importorskip("trl")
    from qadapter.eval.baselines import train_baseline

    records = read_records(marker_records(8)).records
    config = QAdapterConfig(max_steps=2, batch_size=4, micro_batch_size=2, warmup_ratio=0.0, max_length=48, max_prompt_length=24)
    train_baseline("sft", records, tmp_path / "sft", model=str(tiny_model_dir), config=config, log=quiet, report_to="tensorboard")
    runs = list((tmp_path / "sft" / tracking.LOGS / "runs").iterdir())
    assert len(runs) == 1 and set(scalars(runs[0])["train/loss"]) <= {1, 2}
    logged_steps = json.loads((tmp_path / "sft" / "adapter" / "baseline.json").read_text())["log_history"]
    assert scalars(runs[0])["train/loss"] == pytest.approx({h["step"]: h["loss"] for h in logged_steps if "loss" in h})


def test_peer_refuses_a_tracker_trl_lacks(monkeypatch):
    """aim is one of accelerate's trackers but not one of transformers': a peer refuses it before training."""
    import accelerate.tracking
    from accelerate.utils import LoggerType

    from qadapter.eval.baselines import trl_trackers

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [LoggerType.AIM])
    assert tracking.trackers("aim") == ["aim"]
    with pytest.raises(ConfigError, match="report_to: TRL cannot report to aim"):
        trl_trackers("aim")
