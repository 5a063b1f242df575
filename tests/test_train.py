"""Training end to end on a tiny model with a preference it can learn."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qadapter.checkpoint import latest_checkpoint, load_trainer_state
from qadapter.config import QAdapterConfig
from qadapter.data import read_records, split_by_prompt
from qadapter.errors import ConfigError
from qadapter.training import train

from conftest import marker_records

FAST = dict(learning_rate=5e-3, batch_size=8, micro_batch_size=4, warmup_ratio=0.0, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="module")
def split():
    return split_by_prompt(read_records(marker_records(60)).records, 0.25)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_learns_marker_preference(tiny_model_dir, split, tmp_path, precision):
    """'good' beats 'bad': held-out accuracy goes from chance to > 0.9 and the BT loss falls, training
    in float32 or in bf16 (as 'auto' picks on CPUs with native bf16); held-out scores in float32 either way."""
    train_records, eval_records = split
    result = train(
        QAdapterConfig(epochs=3, **FAST), train_records, eval_records, tmp_path / "run", model=str(tiny_model_dir), mixed_precision=precision, progress=False, log=lambda s: None
    )
    m = result.metrics
    assert (m["precision"], m["eval_precision"]) == ({"no": "float32", "bf16": "bf16"}[precision], "float32")
    assert abs(m["pref_accuracy_before"] - 0.5) < 0.15
    assert m["pref_accuracy_after"] > 0.9
    losses = [h["bt_loss"] for h in m["history"] if "bt_loss" in h]
    assert losses[-1] < 0.5 * losses[0]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("pref_accuracy_before", "pref_accuracy_after", "n_eval_pairs", "train_seconds"):
        assert key in saved
    assert saved["n_eval_pairs"] == len(eval_records)
    assert saved["environment"]["versions"]["torch"] == torch.__version__ and saved["environment"]["date"]  # what produced it
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, split, tmp_path):
    """batch 8 as 2 × 4 accumulated micro-batches gives the same adapter as 1 × 8 (no dropout)."""
    train_records, _ = split
    adapters = []
    for micro in (8, 4):
        cfg = QAdapterConfig(max_steps=3, lora_dropout=0.0, **{**FAST, "micro_batch_size": micro})
        result = train(cfg, train_records, [], tmp_path / f"m{micro}", model=str(tiny_model_dir), mixed_precision="no", progress=False, log=lambda s: None)
        from safetensors.torch import load_file

        adapters.append(load_file(result.adapter_dir / "adapter_model.safetensors"))
    for key in adapters[0]:
        torch.testing.assert_close(adapters[0][key], adapters[1][key], rtol=1e-4, atol=1e-6)


def test_resume_reproduces_uninterrupted_run(tiny_model_dir, split, tmp_path):
    """Resuming from the step-4 checkpoint ends with the same adapter as running 8 steps straight (dropout on)."""
    from safetensors.torch import load_file

    train_records, eval_records = split
    cfg = QAdapterConfig(max_steps=8, **FAST)
    kwargs = dict(model=str(tiny_model_dir), progress=False, log=lambda s: None, save_every=4, eval_every=100)
    full = train(cfg, train_records, eval_records, tmp_path / "full", **kwargs)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000004", resumed_dir / "checkpoints" / "step-000004")
    assert latest_checkpoint(resumed_dir / "checkpoints").name == "step-000004"
    # the progress section keeps the keys checkpoints have always had, so older ones still resume
    progress = load_trainer_state(resumed_dir / "checkpoints" / "step-000004")["progress"]
    assert set(progress) == {"step", "history", "before", "train_seconds", "skipped_steps", "data_digest", "eval_seconds"}
    resumed = train(cfg, train_records, eval_records, resumed_dir, resume=True, **kwargs)
    a, b = load_file(full.adapter_dir / "adapter_model.safetensors"), load_file(resumed.adapter_dir / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert resumed.metrics["steps"] == 8 and resumed.metrics["pref_accuracy_before"] == full.metrics["pref_accuracy_before"]


def test_refuses_to_overwrite_a_run(tiny_model_dir, split, tmp_path):
    """An output folder holding a run is never replaced silently."""
    train_records, _ = split
    cfg = QAdapterConfig(max_steps=1, **FAST)
    train(cfg, train_records, [], tmp_path / "run", model=str(tiny_model_dir), progress=False, log=lambda s: None)
    with pytest.raises(ConfigError, match="--overwrite"):
        train(cfg, train_records, [], tmp_path / "run", model=str(tiny_model_dir), progress=False, log=lambda s: None)
    train(cfg, train_records, [], tmp_path / "run", model=str(tiny_model_dir), progress=False, log=lambda s: None, overwrite=True)


def test_resume_with_other_settings_is_refused(tiny_model_dir, split, tmp_path):
    """Resuming a checkpoint with a changed config fails instead of mixing two runs."""
    train_records, _ = split
    kwargs = dict(model=str(tiny_model_dir), progress=False, log=lambda s: None, save_every=1)
    train(QAdapterConfig(max_steps=2, **FAST), train_records, [], tmp_path / "run", **kwargs)
    with pytest.raises(ConfigError, match="different settings"):
        train(QAdapterConfig(max_steps=2, beta=0.5, **{k: v for k, v in FAST.items()}), train_records, [], tmp_path / "run", resume=True, **kwargs)


def test_nonfinite_loss_is_skipped_or_stops(tiny_model_dir, split, tmp_path, monkeypatch):
    """A NaN loss never reaches the adapter: the step is skipped (counted), or the run stops with a clear error."""
    from qadapter import objective
    from qadapter.training import NonFiniteLoss

    train_records, _ = split
    real = objective.pair_objective
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(objective, "pair_objective", poisoned)
    cfg = QAdapterConfig(max_steps=2, **FAST)
    result = train(cfg, train_records, [], tmp_path / "skip", model=str(tiny_model_dir), progress=False, log=lambda s: None)
    assert result.metrics["skipped_steps"] == 1
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(result.adapter_dir / "adapter_model.safetensors").values())
    calls["n"] = 0
    with pytest.raises(NonFiniteLoss, match="step 1"):
        train(cfg, train_records, [], tmp_path / "stop", model=str(tiny_model_dir), progress=False, log=lambda s: None, on_nonfinite="stop")


def test_two_runs_never_share_an_output_folder(tiny_model_dir, split, tmp_path):
    """While one run holds the folder, a second one is refused with a clear message."""
    import fcntl

    train_records, _ = split
    lock_path = tmp_path / ".run.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train() holds it
        with pytest.raises(ConfigError, match="in use by another training run"):
            train(QAdapterConfig(max_steps=1, **FAST), train_records, [], tmp_path / "run", model=str(tiny_model_dir), progress=False, log=lambda s: None)
    train(QAdapterConfig(max_steps=1, **FAST), train_records, [], tmp_path / "run", model=str(tiny_model_dir), progress=False, log=lambda s: None)


def test_resume_refuses_other_data_and_finished_runs(tiny_model_dir, split, tmp_path):
    """--resume on different training data, or on a finished run without checkpoints, stops with a clear message."""
    train_records, eval_records = split
    kwargs = dict(model=str(tiny_model_dir), progress=False, log=lambda s: None, save_every=1)
    cfg = QAdapterConfig(max_steps=3, **FAST)
    train(cfg, train_records, eval_records, tmp_path / "run", **kwargs)
    with pytest.raises(ConfigError, match="different data"):
        train(cfg, train_records[:-4], eval_records, tmp_path / "run", resume=True, **kwargs)
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints")
    with pytest.raises(ConfigError, match="finished run"):
        train(cfg, train_records, eval_records, tmp_path / "run", resume=True, **kwargs)
