"""Save → load restores the identical customized policy; wrong bases are refused; writes are atomic."""

from __future__ import annotations

import json

import pytest
import torch

from qadapter import checkpoint
from qadapter.config import QAdapterConfig
from qadapter.decode import encode_prompts
from qadapter.errors import ModelError
from qadapter.model import QAdapterModel, load_base


@pytest.fixture()
def trained(tiny_model_dir):
    qm = QAdapterModel.create(load_base(str(tiny_model_dir), device="cpu"), QAdapterConfig(alpha_0=0.7, alpha_tilde=1.3, q_form="raw"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in qm.peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return qm


def _policy_logits(qm):
    from qadapter import objective

    ids, mask = encode_prompts(qm.tokenizer, ["tell me about the cat", "hello"])
    with torch.no_grad():
        q, base = qm.q_and_base_logprobs(ids, mask)
    return objective.combined_logits(q, base, qm.config.alpha_0, qm.config.alpha_tilde)


def test_round_trip_gives_identical_logits(trained, tmp_path):
    """from_pretrained(save_pretrained(m)) has the same config and bit-identical customized logits."""
    trained.save_pretrained(tmp_path / "adapter")
    loaded = QAdapterModel.from_pretrained(tmp_path / "adapter", device="cpu")
    assert loaded.config == trained.config
    assert torch.equal(_policy_logits(loaded), _policy_logits(trained))


def test_only_adapter_files_are_written(trained, tmp_path):
    """PEFT layout in safetensors plus qadapter_config.json; no base weights, no temp leftovers."""
    trained.save_pretrained(tmp_path / "adapter")
    names = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "qadapter_config.json"} <= names
    assert not names & {"model.safetensors", "config.json", "pytorch_model.bin", "adapter_model.bin"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    meta = json.loads((tmp_path / "adapter" / "qadapter_config.json").read_text())
    assert meta["config"]["alpha_0"] == 0.7 and meta["config"]["alpha_tilde"] == 1.3
    assert meta["base"]["chat_template_sha256"] and meta["base"]["fingerprint"]


def test_refuses_a_different_base(trained, tmp_path, other_model_dir):
    """Loading onto other weights fails with a message naming the problem; the override allows it."""
    trained.save_pretrained(tmp_path / "adapter")
    other = load_base(str(other_model_dir), device="cpu")
    with pytest.raises(ModelError, match="weights differ"):
        QAdapterModel.from_pretrained(tmp_path / "adapter", base=other)
    loaded = QAdapterModel.from_pretrained(tmp_path / "adapter", base=load_base(str(other_model_dir), device="cpu"), allow_base_mismatch=True)
    assert loaded.config == trained.config


def test_refuses_a_different_chat_template(trained, tmp_path, tiny_model_dir):
    """A base whose chat template changed is refused (the adapter learned on the old rendering)."""
    trained.save_pretrained(tmp_path / "adapter")
    base = load_base(str(tiny_model_dir), device="cpu")
    base.identity.chat_template_sha256 = "0" * 64
    with pytest.raises(ModelError, match="chat template"):
        QAdapterModel.from_pretrained(tmp_path / "adapter", base=base)


def test_plain_peft_folder_is_not_a_qadapter(trained, tmp_path):
    """A LoRA folder without qadapter_config.json is refused with a hint, not served as the wrong policy."""
    trained.peft_model.save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(ModelError, match="qadapter_config.json"):
        QAdapterModel.from_pretrained(tmp_path / "lora", device="cpu")


def test_failed_save_keeps_previous_adapter(trained, tmp_path, monkeypatch):
    """A crash in the middle of a save leaves the earlier adapter untouched and no temporary folder behind."""
    trained.save_pretrained(tmp_path / "adapter")
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()

    def crash(qmodel, folder):
        (folder / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_adapter_files", crash)
    with pytest.raises(KeyboardInterrupt):
        trained.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_json_writes_are_atomic(tmp_path, monkeypatch):
    """write_json_atomic replaces the file whole or not at all."""
    path = tmp_path / "metrics.json"
    checkpoint.write_json_atomic(path, {"a": 1})
    monkeypatch.setattr(checkpoint.json, "dump", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        checkpoint.write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
