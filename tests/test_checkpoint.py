"""Save → load restores the identical customized policy; wrong bases are refused; writes are atomic."""

from __future__ import annotations

import json
import pickle
import random

import pytest
import torch

from conftest import ShellPayload
from qadapter import atomic, checkpoint
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
    atomic.write_json_atomic(path, {"a": 1})
    monkeypatch.setattr(atomic.json, "dump", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        atomic.write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# ---------------------------------------------------------------------------------------------
# Trainer state: read back with weights_only=True, so a tampered checkpoint cannot run code


def _plain_state(**progress):
    return {
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {},
        "rng": checkpoint.rng_state(),
        "progress": {"step": 4, "history": [], "before": None, "train_seconds": 1.0, "skipped_steps": 0, "data_digest": "x", **progress},
    }


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dumps"])
def test_trainer_state_with_code_is_refused_unrun(tmp_path, writer):
    """A trainer_state.pt carrying an object whose __reduce__ calls os.system is refused, naming the file,
    and the command never runs (torch.load(weights_only=True) builds plain data only)."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "step-000004" / checkpoint.TRAINER_STATE
    path.parent.mkdir()
    state = {**_plain_state(), "optimizer": ShellPayload(marker)}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    with pytest.raises(ModelError) as info:
        checkpoint.load_trainer_state(path.parent)
    message = str(info.value)
    assert message.startswith(f"{path}: refused: ") and "plain data" in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a readable trainer state"),
        (b"\x00garbage" * 8, "refused"),
        ({"optimizer": {}}, "malformed trainer state (expected the sections optimizer, scheduler, rng, progress)"),
        (_plain_state(step="4"), "malformed trainer state (progress field(s) step)"),
        (_plain_state(step=True), "malformed trainer state (progress field(s) step)"),
        (_plain_state(history=None), "malformed trainer state (progress field(s) history)"),
    ],
    ids=["empty", "garbage", "missing-sections", "step-string", "step-bool", "history-none"],
)
def test_malformed_trainer_state_is_one_line_error(tmp_path, content, message):
    """A damaged or re-laid-out trainer_state.pt gives a ModelError naming it, not a traceback on resume."""
    path = tmp_path / checkpoint.TRAINER_STATE
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ModelError) as info:
        checkpoint.load_trainer_state(tmp_path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value) and "\n" not in str(info.value)


def test_saved_trainer_state_round_trips_as_plain_data(tmp_path):
    """What training saves (optimizer, scheduler, RNG states, progress) loads under weights_only=True and
    restores the RNG streams exactly."""
    from transformers import get_scheduler

    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    params[0].grad = torch.ones(3)
    optimizer.step()
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    scheduler.step()
    random.seed(5)
    torch.manual_seed(5)
    state = {**_plain_state(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save(state, tmp_path / checkpoint.TRAINER_STATE)
    expected = (random.random(), torch.rand(3))
    loaded = checkpoint.load_trainer_state(tmp_path)
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    checkpoint.restore_trainer_state(loaded, tmp_path, fresh, get_scheduler("cosine", fresh, num_warmup_steps=1, num_training_steps=10))
    restored = (random.random(), torch.rand(3))
    assert restored[0] == expected[0] and torch.equal(restored[1], expected[1])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_foreign_scheduler_state_is_refused(tmp_path):
    """A scheduler state with keys this run's scheduler lacks would set arbitrary attributes: refused."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    state = {**_plain_state(), "scheduler": {**scheduler.state_dict(), "optimizer": {}}}
    with pytest.raises(ModelError, match=r"trainer_state\.pt: trainer state does not fit this run \(scheduler keys"):
        checkpoint.restore_trainer_state(state, tmp_path, optimizer, scheduler)


def test_latest_checkpoint_ignores_foreign_folders(tmp_path):
    """Only step-N folders holding a trainer state count; a stray step-x folder does not crash resume."""
    for name in ("step-000002", "step-000010", "step-latest", "step-"):
        (tmp_path / name).mkdir()
        (tmp_path / name / checkpoint.TRAINER_STATE).write_bytes(b"")
    (tmp_path / "step-000010" / checkpoint.TRAINER_STATE).unlink()  # an unfinished one
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-000002"


def test_conv1d_adapter_round_trip(tmp_path):
    """GPT-2-style Conv1D layers (weight stored as in × out, fan_in_fan_out) pass the tensor-shape check and load."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    qm = QAdapterModel.create(load_base(str(tmp_path / "gpt2"), device="cpu"), QAdapterConfig(target_modules=["c_attn"], q_form="raw"))
    with torch.no_grad():
        for name, p in qm.peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.3)
    qm.save_pretrained(tmp_path / "adapter")
    loaded = QAdapterModel.from_pretrained(tmp_path / "adapter", device="cpu")
    assert torch.equal(_policy_logits(loaded), _policy_logits(qm))


def test_output_layer_adapter_round_trip(tmp_path, tiny_model_dir):
    """LoRA on lm_head: PEFT saves the (tied) output layer whole beside the factors; the shape check accepts it."""
    qm = QAdapterModel.create(load_base(str(tiny_model_dir), device="cpu"), QAdapterConfig(target_modules=["q_proj", "lm_head"], q_form="raw"))
    qm.save_pretrained(tmp_path / "adapter")
    assert "base_model.model.lm_head.base_layer.weight" in checkpoint._tensor_shapes(tmp_path / "adapter" / checkpoint.ADAPTER_WEIGHTS)
    loaded = QAdapterModel.from_pretrained(tmp_path / "adapter", device="cpu")
    assert torch.equal(_policy_logits(loaded), _policy_logits(qm))
