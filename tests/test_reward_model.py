"""The TRL reward-model judge on the tiny model: trained on a marker preference, saved as a plain
sequence-classification folder that :class:`RewardModelJudge` loads, and it learns the preference."""

from __future__ import annotations

import json

import torch

from qadapter.data import read_records
from qadapter.eval.judge import RewardModelJudge, pairwise_accuracy
from qadapter.eval.reward_model import INFO_FILE, RewardSettings, train_reward_model

from conftest import marker_records


def test_reward_model_learns_marker_preference_and_loads_as_judge(tiny_model_dir, tmp_path):
    train = read_records(marker_records(16)).records  # 32 pairs: "good" beats "bad"
    held_out = read_records(marker_records(8, seed=3)).records
    settings = RewardSettings(epochs=6, learning_rate=2e-3, batch_size=8, max_length=64, train_layers=1)
    folder = train_reward_model(train, tmp_path / "rm", model=str(tiny_model_dir), settings=settings, mixed_precision="no", log=lambda m: None)

    info = json.loads((folder / INFO_FILE).read_text())
    assert info["trainer"] == "RewardTrainer" and info["n_pairs"] == 32 and info["n_pairs_kept"] == 32
    assert info["steps"] == 24 and info["settings"]["learning_rate"] == 2e-3 and info["trained_layers"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left behind

    from safetensors.torch import load_file

    base, rm = load_file(tiny_model_dir / "model.safetensors"), load_file(folder / "model.safetensors")
    bottom, top = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(rm[bottom], base[bottom]) and not torch.equal(rm[top], base[top])  # only the top block trained

    judge = RewardModelJudge(str(folder), device="cpu")
    assert pairwise_accuracy(judge, held_out).accuracy >= 0.75  # 0.5 is chance on unseen prompts
