"""The model wrapper on a tiny random Llama: loading, LoRA, the two passes, and the batch → loss path."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from qadapter import objective
from qadapter.collate import collate_pairs, tokenize_pair
from qadapter.config import QAdapterConfig
from qadapter.data import read_records
from qadapter.errors import ConfigError, ModelError
from qadapter.model import QAdapterModel, load_base

from conftest import marker_records


@pytest.fixture()
def qmodel(tiny_model_dir):
    return QAdapterModel.create(load_base(str(tiny_model_dir), device="cpu"), QAdapterConfig(lora_dropout=0.0))


def _batch(qmodel, n_prompts=3, padding_side="right"):
    records = read_records(marker_records(n_prompts, seed=1)).records
    pairs = [tokenize_pair(r, qmodel.tokenizer, 64, 32) for r in records]
    return collate_pairs(pairs, qmodel.tokenizer.pad_token_id, padding_side)


def _perturb_lora(qmodel, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in qmodel.peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_base_is_frozen_and_lora_is_trainable(qmodel):
    """Only LoRA matrices on the configured modules train; the paper's default is q_proj and v_proj."""
    trainable = [n for n, p in qmodel.peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].split(".")[-1] for n in trainable} == {"q_proj", "v_proj"}


def test_residual_q_is_exactly_zero_at_init(qmodel):
    """A fresh adapter (LoRA B = 0) gives Q ≡ 0 exactly in the residual form."""
    batch = _batch(qmodel)
    q, base_logprobs = qmodel.q_and_base_logprobs(batch.input_ids, batch.attention_mask)
    assert torch.equal(q, torch.zeros_like(q))
    assert_close(base_logprobs.exp().sum(-1), torch.ones(q.shape[:2]))


def test_base_pass_builds_no_graph(qmodel):
    """The base logits carry no autograd history; the adapted logits do."""
    batch = _batch(qmodel)
    assert not qmodel.base_logits(batch.input_ids, batch.attention_mask).requires_grad
    assert qmodel.adapter_logits(batch.input_ids, batch.attention_mask).requires_grad


def test_left_and_right_padding_give_same_loss(qmodel):
    """Explicit position ids make left- and right-padded batches score identically."""
    _perturb_lora(qmodel)
    losses = []
    for side in ("right", "left"):
        batch = _batch(qmodel, padding_side=side)
        terms = qmodel.token_terms(batch)
        out = objective.pair_objective(terms, batch.chosen_index, batch.rejected_index, gamma=1.0, beta=0.1)
        losses.append(out.loss.detach())
    assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)


def test_padding_tokens_do_not_matter(qmodel):
    """Changing the token id used for padding changes nothing."""
    _perturb_lora(qmodel)
    batch = _batch(qmodel)
    ref = objective.pair_objective(qmodel.token_terms(batch), batch.chosen_index, batch.rejected_index, gamma=1.0, beta=0.1).loss
    batch.input_ids = torch.where(batch.attention_mask.bool(), batch.input_ids, torch.full_like(batch.input_ids, 7))
    other = objective.pair_objective(qmodel.token_terms(batch), batch.chosen_index, batch.rejected_index, gamma=1.0, beta=0.1).loss
    assert_close(ref.detach(), other.detach(), rtol=1e-5, atol=1e-6)


def test_gradient_reaches_only_lora(qmodel):
    """Backward through the loss fills LoRA gradients and nothing else."""
    _perturb_lora(qmodel)
    batch = _batch(qmodel)
    out = objective.pair_objective(qmodel.token_terms(batch), batch.chosen_index, batch.rejected_index, gamma=1.0, beta=0.1)
    out.loss.mean().backward()
    grads = {n: p.grad for n, p in qmodel.peft_model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_missing_target_module_is_reported(tiny_model_dir):
    """A LoRA target that the model lacks fails with the module name in the message."""
    base = load_base(str(tiny_model_dir), device="cpu")
    with pytest.raises(ModelError, match="query_key_value"):
        QAdapterModel.create(base, QAdapterConfig(target_modules=["query_key_value"]))


def test_unknown_model_is_a_model_error(tmp_path):
    """A folder without a model fails with ModelError naming it, not a deep traceback."""
    with pytest.raises(ModelError, match=str(tmp_path)):
        load_base(str(tmp_path), device="cpu")
    with pytest.raises(ModelError, match="no such GGUF"):
        load_base(str(tmp_path / "missing.gguf"), device="cpu")


def test_identity_detects_other_weights(tiny_model_dir, other_model_dir):
    """Same architecture, different weights → a mismatch; the same model → none."""
    a = load_base(str(tiny_model_dir), device="cpu").identity
    b = load_base(str(other_model_dir), device="cpu").identity
    assert a.mismatches(load_base(str(tiny_model_dir), device="cpu").identity) == []
    assert any("weights differ" in p for p in a.mismatches(b))


def test_hidden_path_matches_logits_path(qmodel):
    """The hidden-state scoring (chosen automatically for this bias-free Llama) equals the full-logits path, loss and gradient."""
    assert qmodel.hidden_path
    _perturb_lora(qmodel)
    qmodel.peft_model.eval()
    batch = _batch(qmodel)
    results = []
    for hidden in (True, False):
        qmodel.hidden_path = hidden
        qmodel.peft_model.zero_grad()
        out = objective.pair_objective(qmodel.token_terms(batch), batch.chosen_index, batch.rejected_index, gamma=1.0, beta=0.1)
        out.loss.sum().backward()
        grads = [p.grad.clone() for n, p in qmodel.peft_model.named_parameters() if p.grad is not None]
        results.append((out.loss.detach(), grads))
    assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_training_mode_leaves_base_dropout_off(tmp_path):
    """set_training(True) turns on LoRA dropout only: a base with dropout stays deterministic, so Q = 0 at init."""
    from conftest import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, attention_dropout=0.5, pad_token_id=0, eos_token_id=2, bos_token_id=1, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    qm = QAdapterModel.create(load_base(str(tmp_path), device="cpu"), QAdapterConfig())
    qm.set_training(True)
    assert qm.training and not qm.peft_model.get_base_model().model.layers[0].self_attn.training
    batch = _batch(qm)
    q, _ = qm.q_and_base_logprobs(batch.input_ids, batch.attention_mask)
    assert torch.equal(q, torch.zeros_like(q))


def test_a_loaded_base_carries_one_adapter(tiny_model_dir):
    """PEFT edits the base in place, so attaching a second adapter to the same loaded base is refused."""
    base = load_base(str(tiny_model_dir), device="cpu")
    QAdapterModel.create(base, QAdapterConfig())
    with pytest.raises(ModelError, match="already carries an adapter"):
        QAdapterModel.create(base, QAdapterConfig())


def test_hidden_path_also_in_bfloat16(tiny_model_dir):
    """The linearity check tolerates the dtype's rounding: bf16 weights keep the lean scoring path."""
    qm = QAdapterModel.create(load_base(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16), QAdapterConfig())
    assert qm.hidden_path


def test_lora_on_the_output_layer_disables_the_hidden_path(tiny_model_dir):
    """With LoRA on lm_head, logits are not the frozen W·h, so scoring falls back to full logits."""
    qm = QAdapterModel.create(load_base(str(tiny_model_dir), device="cpu"), QAdapterConfig(target_modules=["q_proj", "lm_head"]))
    assert not qm.hidden_path


def test_rank_above_hidden_size_is_refused(tiny_model_dir):
    """A LoRA rank above the base's hidden size adds nothing but memory: refused before any layer is built."""
    base = load_base(str(tiny_model_dir), device="cpu")
    with pytest.raises(ConfigError, match=r"^lora_r must be <= the base model's hidden size \(64\), got 65$"):
        QAdapterModel.create(base, QAdapterConfig(lora_r=65))
    assert not hasattr(base.model, "peft_config")
