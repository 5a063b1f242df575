"""The command line on a tiny model: train → info → generate, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qadapter.cli import app

from conftest import marker_records


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in marker_records(20)) + "\n")
    return path


def test_help_lists_commands():
    """`qadapter --help` shows every command; config options carry the dataclass help text."""
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "generate", "info"):
        assert command in result.output
    train_help = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert "--alpha-0" in train_help and "larger keeps the model closer to the base" in train_help.lower()


def test_train_info_generate(tiny_model_dir, data_file, tmp_path):
    """A short run writes adapter + metrics; info shows them; generate prints base and customized answers."""
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out), "--max-steps", "2",
         "--batch-size", "4", "--micro-batch-size", "2", "--no-progress", "--alpha-0", "0.5"],
    )
    assert result.exit_code == 0, result.output
    assert "held-out preference accuracy" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["config"]["alpha_0"] == 0.5 and metrics["n_eval_pairs"] > 0
    info = runner.invoke(app, ["info", str(out)], env={"COLUMNS": "200"})
    assert info.exit_code == 0 and "alpha_0" in info.output and "pref_accuracy_after" in info.output
    gen = runner.invoke(app, ["generate", "--adapter", str(out), "--compare", "--max-new-tokens", "4", "--alpha-0", "2", "hello there"], env={"COLUMNS": "200"})
    assert gen.exit_code == 0, gen.output
    assert "base" in gen.output and "α₀=2" in gen.output


def test_existing_output_is_refused(tiny_model_dir, data_file, tmp_path):
    """A second run into the same folder stops with a message naming --resume / --overwrite."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code != 0 and "--overwrite" in str(result.exception)


def test_bad_input_is_one_line(tmp_path):
    """A malformed data file ends the process with exit 2 and one line naming file and line, no traceback."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": 1}\n')
    env = {**os.environ, "COLUMNS": "300"}
    env.pop("QADAPTER_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "qadapter", "train", "--data", str(bad), "--output", str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert f"{bad}:2:" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_option_value_names_the_field(tmp_path, data_file):
    """An out-of-range setting is reported with the field name before anything is loaded."""
    proc = subprocess.run([sys.executable, "-m", "qadapter", "train", "--data", str(data_file), "--alpha-0", "-1", "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "alpha_0 must be > 0" in proc.stderr


def test_train_without_data_uses_the_default_dataset(tiny_model_dir, tmp_path, monkeypatch):
    """`qadapter train` with no --data reads DSP from $QADAPTER_DATA_DIR, when set, with the 'academy' preference."""
    folder = tmp_path / "shared" / "dsp"
    folder.mkdir(parents=True)
    styles = {"academy": "the answer is good and very nice", "business": "bad", "normal": "no", "literature": "maybe so"}
    rows = [{"query": f"tell me about the {w}", "responses": styles} for w in ("cat", "dog", "mat", "log", "red", "blue", "big", "small")]
    (folder / "domain_specific_preference.json").write_text(json.dumps(rows))
    monkeypatch.setenv("QADAPTER_DATA_DIR", str(tmp_path / "shared"))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--output", str(out), "--max-steps", "1", "--no-progress"])
    assert result.exception is None and result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prefer"] == "academy" and metrics["data"] == "dsp/domain_specific_preference.json"
    assert metrics["n_train_pairs"] + metrics["n_eval_pairs"] == 8 * 3


def _qadapter(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "1000", "OMP_NUM_THREADS": "1"}
    env.pop("QADAPTER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "qadapter", *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--learning-rate", "inf", "learning_rate must be > 0 and <= 1, got inf"),
        ("--learning-rate", "nan", "learning_rate must be > 0 and <= 1, got nan"),
        ("--alpha-0", "inf", "alpha_0 must be > 0 and <= 10000, got inf"),
        ("--alpha-tilde", "inf", "alpha_tilde must be > 0 and <= 10000, got inf"),
        ("--lora-alpha", "inf", "lora_alpha must be > 0 and <= 10000, got inf"),
        ("--epochs", "inf", "epochs must be > 0 and <= 10000, got inf"),
        ("--beta", "inf", "beta must be finite and >= 0, got inf"),
        ("--lora-r", "1000000", "lora_r must be >= 1 and <= 65536, got 1000000"),
    ],
)
def test_non_finite_setting_exits_2_with_one_line(tiny_model_dir, tmp_path, data_file, option, value, message):
    """A non-finite or out-of-range setting stops `qadapter train` before anything is loaded: exit 2, one line naming the field."""
    proc = _qadapter("train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(tmp_path / "o"), "--no-progress", option, value)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def saved_adapter(tiny_model_dir, tmp_path_factory):
    from conftest import random_adapter

    return random_adapter(tiny_model_dir, tmp_path_factory.mktemp("cli-adapter") / "adapter")


@pytest.mark.parametrize("value, message", [("Infinity", "alpha_0 must be > 0 and <= 10000, got inf"), ("true", "alpha_0 must be a number, got True")])
def test_adapter_with_non_finite_setting_exits_2(saved_adapter, tmp_path, value, message):
    """`qadapter generate` on an adapter whose qadapter_config.json has alpha_0 Infinity or true: exit 2, one line naming file and field."""
    import shutil

    adapter = Path(shutil.copytree(saved_adapter, tmp_path / "adapter"))
    path = adapter / "qadapter_config.json"
    path.write_text(re.sub(r'"alpha_0": [^,]+,', f'"alpha_0": {value},', path.read_text()))
    proc = _qadapter("generate", "--adapter", str(adapter), "--max-new-tokens", "2", "hello")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {path}: {message}"


@pytest.fixture()
def dataset_dict_folder(tmp_path):
    """A save_to_disk DatasetDict: 'train' prefers 'good', 'test' prefers 'nice'."""
    datasets = pytest.importorskip("datasets")
    rows = {"train": marker_records(6), "test": marker_records(6, seed=1, chosen="nice", rejected="poor")}
    folder = tmp_path / "dd"
    datasets.DatasetDict({name: datasets.Dataset.from_list(r) for name, r in rows.items()}).save_to_disk(str(folder))
    return folder


def test_split_data_reads_the_chosen_split(dataset_dict_folder):
    """--data-split reaches the reader and is recorded with the data's name."""
    from rich.console import Console

    from qadapter.cli import _split_data
    from qadapter.config import QAdapterConfig

    split = _split_data(QAdapterConfig(), str(dataset_dict_folder), None, 0.25, None, None, False, Console(quiet=True), "test")
    assert split.data == f"{dataset_dict_folder} (split=test)"
    assert all("nice" in r.chosen[0]["content"] for r in split.train + split.held_out)


@pytest.mark.parametrize("option", ["--split", "--data-split"])
def test_split_option_missing_split_lists_the_others(dataset_dict_folder, tmp_path, option):
    """`--split NAME` is parsed and a missing split stops the command, naming the available ones, before any training."""
    result = CliRunner().invoke(app, ["train", "--data", str(dataset_dict_folder), option, "valid", "--output", str(tmp_path / "o"), "--no-progress"])
    assert result.exit_code != 0 and "no split 'valid'; splits: train, test" in str(result.exception)
    assert not (tmp_path / "o").exists()


def test_data_config_option_reaches_the_reader(tmp_path, data_file):
    """`--data-config` is passed on: a single file, which has no configs, refuses it."""
    result = CliRunner().invoke(app, ["train", "--data", str(data_file), "--data-config", "x", "--output", str(tmp_path / "o"), "--no-progress"])
    assert result.exit_code != 0 and "has no splits or configs to choose from" in str(result.exception)
