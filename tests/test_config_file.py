"""--config FILE: a YAML or JSON file of a command's options, overridden by flags on the command line.
Parsing is tested up to the training call, which is replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from qadapter.cli import app
from qadapter.errors import ConfigError


WIDE = {"COLUMNS": "250"}


@pytest.fixture()
def write(tmp_path):
    def write(text: str, name: str = "run.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


YAML = """\
# the options of `qadapter train`, as on the command line
max-steps: 3
learning_rate: 0.02        # underscores work too
target-modules: [q_proj, k_proj]
progress: false
report-to: tensorboard
"""


def test_a_config_file_sets_options(parse_train, write):
    seen = parse_train("--config", str(write(YAML)))
    assert (seen["config"].max_steps, seen["config"].learning_rate, seen["config"].target_modules) == (3, 0.02, ["q_proj", "k_proj"])
    assert (seen["progress"], seen["report_to"]) == (False, "tensorboard")


def test_flags_override_the_file(parse_train, write):
    seen = parse_train("--max-steps", "5", "--config", str(write(YAML)), "--target-modules", "o_proj", "--progress")
    assert (seen["config"].max_steps, seen["config"].target_modules, seen["progress"]) == (5, ["o_proj"], True)
    assert seen["config"].learning_rate == 0.02  # not given as a flag: the file's


def test_json_and_comma_lists(parse_train, write):
    seen = parse_train("--config", str(write(json.dumps({"max_steps": 2, "target_modules": "q_proj,o_proj"}), "run.json")))
    assert (seen["config"].max_steps, seen["config"].target_modules) == (2, ["q_proj", "o_proj"])


def test_an_empty_file_changes_nothing(parse_train, write):
    assert parse_train("--config", str(write("")))["config"].max_steps is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("max-step: 3\n", "unknown option 'max-step'"),
        ("sweep: '1,2'\n", "unknown option 'sweep'"),  # an option of another command
        ("config: other.yaml\n", "unknown option 'config'"),
        ("max-steps: three\n", "max-steps: Invalid value for '--max-steps'"),
        ("max-steps: 2.5\n", "max-steps: Invalid value for '--max-steps'"),  # refused, as on the command line, not truncated
        ("max-steps: true\n", "max-steps: Invalid value for '--max-steps'"),
        ("progress: [true]\n", "progress: expected one value"),
        ("learning-rate: {a: 1}\n", "learning-rate: expected a number, text or true/false"),
        ("- max-steps\n", "a config file maps option names to values, got a list"),
        ("max-steps: [1\n", "not valid YAML"),
    ],
)
def test_a_bad_file_names_the_file_and_the_key(parse_train, write, text, message):
    path = write(text)
    error = parse_train("--config", str(path))
    assert isinstance(error, ConfigError) and str(error).startswith(f"{path}: ") and message in str(error), error


def test_a_missing_file_is_named(parse_train, tmp_path):
    error = parse_train("--config", str(tmp_path / "absent.yaml"))
    assert isinstance(error, ConfigError) and str(error) == f"{tmp_path / 'absent.yaml'}: no such config file"


def test_a_required_option_can_come_from_the_file(write):
    """eval's --adapter (required, repeatable) from the file: parsing gets as far as reading the adapter."""
    error = CliRunner().invoke(app, ["eval", "--config", str(write("adapter: q=/nonexistent/run\n"))]).exception
    assert "/nonexistent/run" in str(error) and "qadapter_config.json" in str(error)


@pytest.mark.parametrize("command", ["train", "baseline", "eval", "sweep", "experiment", "generate", "serve"])
def test_every_command_with_options_takes_a_config_file(command):
    result = CliRunner().invoke(app, [command, "--help"], env=WIDE)
    assert result.exit_code == 0 and "--config" in result.output


def test_the_error_is_one_line(write, data_file, tmp_path):
    """From the shell: exit 2 and one line naming the file and the key, before anything is loaded."""
    path = write("max-steps: 3\nlearning-rat: 0.1\n")
    env = {**os.environ, "COLUMNS": "300", "OMP_NUM_THREADS": "1"}
    env.pop("QADAPTER_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "qadapter", "train", "--data", str(data_file), "--output", str(tmp_path / "o"), "--config", str(path)],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {path}: unknown option 'learning-rat': `qadapter train --help` lists the options"
