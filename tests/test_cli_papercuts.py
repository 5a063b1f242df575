"""CLI papercuts (issue 14): --target-modules lists and 'all-linear', TRL's underscore spellings,
per-command options, --version. Parsing is tested up to the training call, which is replaced."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import qadapter
from qadapter.cli import app, config_options
from qadapter.config import METHOD_FIELDS, QAdapterConfig


WIDE = {"COLUMNS": "250"}  # one option per help line


def _help(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return result.output


def _lists(text: str, option: str) -> bool:
    return re.search(rf"{option}(?![\w-])", text) is not None  # --beta, not --beta-dpo


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--target-modules", "q_proj,v_proj"], ["q_proj", "v_proj"]),
        (["--target-modules", "q_proj, k_proj,"], ["q_proj", "k_proj"]),
        (["--target-modules", "q_proj", "--target-modules", "k_proj,o_proj"], ["q_proj", "k_proj", "o_proj"]),
        (["--target-modules", "all-linear"], "all-linear"),
        ([], ["q_proj", "v_proj"]),
    ],
)
def test_target_modules_take_comma_lists_and_all_linear(parse_train, args, expected):
    assert parse_train(*args)["config"].target_modules == expected


def test_all_linear_trains_saves_and_loads(tiny_model_dir, data_file, tmp_path):
    """PEFT resolves 'all-linear': adapter_config.json records the resolved names (what loading uses),
    qadapter_config.json the setting as given (what resuming compares); the adapter loads and generates."""
    from safetensors import safe_open

    runner, out = CliRunner(), tmp_path / "run"
    train = ["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out), "--max-steps", "1", "--no-progress"]
    result = runner.invoke(app, [*train, "--target-modules", "all-linear"])
    assert result.exit_code == 0, result.output
    linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # every Linear of a layer; not lm_head
    resolved = json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(resolved, list) and len(resolved) == 2 * len(linear)  # PEFT records full paths, e.g. model.layers.0.mlp.down_proj
    assert {name.rsplit(".", 1)[-1] for name in resolved} == linear
    assert json.loads((out / "adapter" / "qadapter_config.json").read_text())["config"]["target_modules"] == "all-linear"
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), framework="pt") as handle:
        assert {key.split(".")[-3] for key in handle.keys()} == linear  # ….mlp.down_proj.lora_A.weight
    generated = runner.invoke(app, ["generate", "--adapter", str(out), "--max-new-tokens", "2", "hello"])
    assert generated.exit_code == 0, generated.output


def test_unknown_target_module_is_one_line_naming_the_field(tiny_model_dir, data_file, tmp_path):
    env = {**os.environ, **WIDE, "OMP_NUM_THREADS": "1"}
    env.pop("QADAPTER_DEBUG", None)
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(tmp_path / "o"), "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "qadapter", *args, "--target-modules", "q_proj,no_such_proj"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after transformers' weight-loading bar
    assert re.fullmatch(r"error: target_modules: no_such_proj not found in \S+ \(or use 'all-linear'\)", last)
    assert "Traceback" not in proc.stderr


def test_underscore_spellings_are_accepted(parse_train):
    """TRL users type --learning_rate: every option, generated from the config or hand-written, flags included."""
    seen = parse_train(
        "--learning_rate", "0.5", "--micro_batch_size=2", "--batch-size", "4", "--target_modules", "k_proj",
        "--eval_every", "7", "--on_nonfinite", "stop", "--no_progress", "--length_normalize",
    )
    config = seen["config"]
    assert (config.learning_rate, config.micro_batch_size, config.batch_size, config.target_modules) == (0.5, 2, 4, ["k_proj"])
    assert config.length_normalize is True
    assert (seen["eval_every"], seen["on_nonfinite"], seen["progress"]) == (7, "stop", False)


def test_help_shows_dashed_names_only_and_typos_still_fail():
    text = _help("train")
    assert "--learning-rate" in text and "--no-progress" in text
    assert "--learning_rate" not in text and "--no_progress" not in text
    result = CliRunner().invoke(app, ["train", "--learning_rat", "0.1"], env=WIDE)
    assert result.exit_code == 2 and "No such option" in result.output


def test_relaunch_drops_num_processes_in_either_spelling(monkeypatch):
    from qadapter import cli

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command: calls.append(command) or 0)
    for given in (["--num-processes", "2"], ["--num_processes", "2"], ["--num_processes=2"]):
        monkeypatch.setattr(sys, "argv", ["qadapter", "train", *given, "--max_steps", "3"])
        assert cli._relaunch(2) == 0
        assert calls[-1][calls[-1].index("qadapter") :] == ["qadapter", "train", "--max_steps", "3"]


def test_baseline_help_lists_only_settings_it_uses():
    """The peers train with TRL: the Q-Adapter method's own fields are neither listed nor accepted."""
    baseline, train = _help("baseline"), _help("train")
    for name in METHOD_FIELDS:
        option = "--" + name.replace("_", "-")
        assert _lists(train, option) and not _lists(baseline, option), option
    for option in ("--lora-r", "--target-modules", "--learning-rate", "--max-length", "--beta-dpo"):
        assert _lists(baseline, option), option
    result = CliRunner().invoke(app, ["baseline", "dpo", "--alpha-0", "2"], env=WIDE)
    assert result.exit_code == 2 and "No such option" in result.output


def test_config_options_refuses_an_unknown_field_to_skip():
    with pytest.raises(ValueError, match="alpha_zero"):
        config_options(QAdapterConfig, "panel", skip=("alpha_zero",))


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    first, second = result.output.splitlines()
    assert first == f"qadapter {qadapter.__version__}"
    assert re.fullmatch(r"torch \S+, transformers \S+, peft \S+", second)
