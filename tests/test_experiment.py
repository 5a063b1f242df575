"""`qadapter experiment` end to end on a tiny model and a small data folder: the results schema,
the report files, and that a second run reuses every finished stage."""

from __future__ import annotations

import gzip
import json

import pytest
from typer.testing import CliRunner

from qadapter.cli import app

STYLES = {"academy": "the answer is good and very nice", "business": "bad", "normal": "no", "literature": "maybe so"}
WORDS = ("cat", "dog", "mat", "log", "red", "blue", "big", "small", "fast", "slow")


@pytest.fixture()
def data_root(tmp_path, monkeypatch):
    root = tmp_path / "shared"
    (root / "dsp").mkdir(parents=True)
    (root / "dsp" / "domain_specific_preference.json").write_text(json.dumps([{"query": f"tell me about the {w}", "responses": STYLES} for w in WORDS]))
    (root / "arc").mkdir()
    arc = [{"query": f"Question: what is the {w}", "choices": ["good", "bad", "red", "blue"], "gold": i % 4} for i, w in enumerate(WORDS)]
    (root / "arc" / "arc_easy.jsonl").write_text("\n".join(json.dumps(r) for r in arc))
    (root / "gsm8k").mkdir()
    (root / "gsm8k" / "test.jsonl").write_text("\n".join(json.dumps({"question": "one and two", "answer": f"so #### {n}"}) for n in (3, 4)))
    (root / "hh-rlhf" / "helpful-base").mkdir(parents=True)
    hh = [{"chosen": f"\n\nHuman: what is a {w}\n\nAssistant: it is good", "rejected": f"\n\nHuman: what is a {w}\n\nAssistant: no"} for w in WORDS]
    with gzip.open(root / "hh-rlhf" / "helpful-base" / "test.jsonl.gz", "wt") as handle:
        handle.write("\n".join(json.dumps(r) for r in hh))
    monkeypatch.setenv("QADAPTER_DATA_DIR", str(root))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return root


TRAIN_ARGS = ["--batch-size", "2", "--micro-batch-size", "2", "--max-steps", "2", "--max-length", "48", "--max-prompt-length", "24"]
EVAL_ARGS = ["--sizes", "arc_easy=6,piqa=0,hellaswag=0,boolq=0,mmlu=0,gsm8k=2", "--sweep", "1,4", "--win-prompts", "2", "--eval-fraction", "0.3", "--no-progress"]


def test_experiment_writes_the_schema_and_resumes(tiny_model_dir, data_root, tmp_path):
    """Every method has the checked fields (replay trained the way --replay-base asks), the dial has one row per α₀, and a rerun retrains and re-scores nothing."""
    out = tmp_path / "exp"
    cmd = ["experiment", "--model", str(tiny_model_dir), "--output", str(out), "--peers", "dpo,replay", "--replay-base", "sft", *TRAIN_ARGS, *EVAL_ARGS]
    result = CliRunner().invoke(app, cmd)
    assert result.exception is None, result.output
    results = json.loads((out / "results.json").read_text())
    assert {"model", "data", "command", "methods", "sweep", "judge", "environment"} <= set(results)
    assert results["environment"]["precision"] == results["precision"] and "Produced " in (out / "report.md").read_text()
    assert set(results["methods"]) == {"base", "qadapter", "dpo", "replay"}
    assert json.loads((out / "replay" / "adapter" / "baseline.json").read_text())["replay_base"] == "sft"
    for name, m in results["methods"].items():
        assert 0 <= m["retention"]["arc_easy"] <= 1 and m["retention_n"]["arc_easy"] == 6
        assert m["retention_n"]["gsm8k"] == 2
        for key in ("kl_to_base", "pref_accuracy", "win_rate_vs_base"):
            assert key in m
        if name != "base":
            assert 0 <= m["pref_accuracy"] <= 1 and 0 <= m["win_rate_vs_base"] <= 1 and m["kl_to_base"] >= 0
    assert [row["alpha_0"] for row in results["sweep"]] == [1.0, 4.0]
    for name in ("report.md", "dial.png", "dial.csv"):
        assert (out / name).is_file()
    # A second run finds every stage done: same results, adapters untouched.
    stamp = (out / "dpo" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    cached = sorted(p.name for p in (out / "cache").rglob("*.json"))
    again = CliRunner().invoke(app, cmd)
    assert again.exception is None, again.output
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]
    assert (out / "dpo" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (out / "cache").rglob("*.json")) == cached


def test_eval_command_on_existing_adapters(tiny_model_dir, data_root, tmp_path):
    """`qadapter eval` on one trained adapter reports it against the base; bad --adapter values are refused."""
    run = tmp_path / "run"
    trained = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--output", str(run), *TRAIN_ARGS, "--eval-fraction", "0.3", "--no-progress"])
    assert trained.exception is None, trained.output
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["eval", "--adapter", f"mine={run}", "--output", str(out), *EVAL_ARGS])
    assert result.exception is None, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"base", "mine"} and len(results["sweep"]) == 2
    bad = CliRunner().invoke(app, ["eval", "--adapter", str(run), "--output", str(out)])
    assert "NAME=DIR" in str(bad.exception)


def test_changed_settings_are_not_served_from_the_cache(tiny_model_dir, data_root, tmp_path):
    """A second evaluation into the same folder with another dial recomputes what changed instead of
    returning stale (or missing) stages."""
    run = tmp_path / "run"
    CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--output", str(run), *TRAIN_ARGS, "--eval-fraction", "0.3", "--no-progress"])
    out = tmp_path / "report"
    first = CliRunner().invoke(app, ["eval", "--adapter", f"mine={run}", "--output", str(out), *EVAL_ARGS])
    assert first.exception is None, first.output
    args = [a if a != "1,4" else "0.5,2" for a in EVAL_ARGS]
    second = CliRunner().invoke(app, ["eval", "--adapter", f"mine={run}", "--output", str(out), *args])
    assert second.exception is None, second.output
    assert [r["alpha_0"] for r in json.loads((out / "results.json").read_text())["sweep"]] == [0.5, 2.0]
