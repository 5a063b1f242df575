"""Precision is chosen on purpose: 'auto' for training, float32 for every score unless asked, and
the suite can be run as a machine of the other kind would run it (QADAPTER_AUTO_PRECISION)."""

from __future__ import annotations

import pytest
import torch

from qadapter import hardware
from qadapter.collate import tokenize_records
from qadapter.config import Dial, QAdapterConfig
from qadapter.data import read_records
from qadapter.eval.benchmarks import ChoiceItem
from qadapter.eval.retention import PolicySpec, choice_logliks
from qadapter.hardware import AUTO_PRECISION_ENV, choose_mixed_precision, precision_name
from qadapter.model import QAdapterModel, load_base
from qadapter.preference_eval import evaluate_preferences_at

from conftest import marker_records, random_adapter

CPU = torch.device("cpu")


def test_auto_follows_the_cpu_unless_forced(monkeypatch):
    monkeypatch.delenv(AUTO_PRECISION_ENV, raising=False)
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert choose_mixed_precision(CPU) == "bf16"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert choose_mixed_precision(CPU) == "no"
    monkeypatch.setenv(AUTO_PRECISION_ENV, "bf16")
    assert choose_mixed_precision(CPU) == "bf16" and choose_mixed_precision(CPU, "float32") == "no"
    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp64")
    with pytest.raises(ValueError, match="QADAPTER_AUTO_PRECISION='fp64'"):
        choose_mixed_precision(CPU)


def test_precision_names():
    assert [choose_mixed_precision(CPU, n) for n in ("no", "float32", "bfloat16", "bf16", "float16")] == ["no", "no", "bf16", "bf16", "fp16"]
    assert [precision_name(p) for p in ("no", "bf16", "fp16")] == ["float32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="precision must be"):
        choose_mixed_precision(CPU, "int8")


def test_scoring_defaults_to_float32_whatever_auto_picks(tiny_model_dir, tmp_path, monkeypatch):
    """On a CPU with native bf16 'auto' picks bf16; retention scores must still be float32 ones."""
    qmodel = QAdapterModel.from_pretrained(random_adapter(tiny_model_dir, tmp_path / "a"), device="cpu")
    items = [ChoiceItem(str(i), "tell me about the cat", (" good", " bad", " red dog"), 0) for i in range(4)]
    policies = [PolicySpec("base", base=True), PolicySpec("q", 0.5, 0.5)]
    monkeypatch.setenv(AUTO_PRECISION_ENV, "no")
    exact = choice_logliks(qmodel, items, policies)
    monkeypatch.setenv(AUTO_PRECISION_ENV, "bf16")
    assert choice_logliks(qmodel, items, policies) == exact
    assert choice_logliks(qmodel, items, policies, precision="bf16") != exact  # the setting reaches the forward


def test_bf16_scores_agree_with_float32_within_tolerance(tiny_model_dir, tmp_path):
    """bf16 scoring is an approximation: continuation log-likelihoods within 0.1 nats per token and
    pair margins within 0.2 nats on the tiny model (the bundled model moves more: see the README)."""
    qmodel = QAdapterModel.from_pretrained(random_adapter(tiny_model_dir, tmp_path / "a"), device="cpu")
    items = [ChoiceItem(str(i), "tell me about the cat and the dog", (" good", " bad nice", " red dog sat"), 0) for i in range(4)]
    policies = [PolicySpec("base", base=True), PolicySpec("q", 1.0, 1.0)]
    full, half = (choice_logliks(qmodel, items, policies, precision=p) for p in ("no", "bf16"))
    for name in full:
        for item, f_row, h_row in zip(items, full[name], half[name]):
            for choice, f, h in zip(item.choices, f_row, h_row):
                assert abs(f - h) <= 0.1 * len(choice.split()), (name, choice, f, h)
    pairs, _ = tokenize_records(read_records(marker_records(6)).records, qmodel.tokenizer, 64, 32)
    (f32,), (b16,) = (evaluate_preferences_at(qmodel, pairs, [Dial()], precision=p) for p in ("no", "bf16"))
    assert abs(f32.margin_mean - b16.margin_mean) < 0.2


def test_per_pair_margins_come_back_in_input_order(tiny_model_dir, tmp_path):
    qmodel = QAdapterModel.from_pretrained(random_adapter(tiny_model_dir, tmp_path / "a"), device="cpu")
    pairs, _ = tokenize_records(read_records(marker_records(8)).records, qmodel.tokenizer, 64, 32)
    (whole,) = evaluate_preferences_at(qmodel, pairs, [Dial()], batch_size=3, keep_pairs=True)
    singles = [evaluate_preferences_at(qmodel, [p], [Dial()])[0].margin_mean for p in pairs]
    assert whole.margins == pytest.approx(singles, abs=1e-4)
    assert whole.margin_mean == pytest.approx(sum(singles) / len(singles), abs=1e-4) and "margins" in whole.to_dict()


def test_cli_records_both_precisions(tiny_model_dir, tmp_path):
    """`--mixed-precision` sets training, `--eval-precision` every score; metrics.json records both."""
    import json

    from typer.testing import CliRunner

    from qadapter.cli import app

    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in marker_records(8)) + "\n")
    for train_p, eval_p, recorded in (("no", "no", ("float32", "float32")), ("bf16", "bf16", ("bf16", "bf16"))):
        out = tmp_path / f"run-{train_p}"
        args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--max-steps", "1", "--batch-size", "2",
                "--micro-batch-size", "2", "--mixed-precision", train_p, "--eval-precision", eval_p, "--no-progress"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        metrics = json.loads((out / "metrics.json").read_text())
        assert (metrics["precision"], metrics["eval_precision"]) == recorded
