"""Export: one plain model for the customized policy. Exact for residual Q at α₀ = 1 (merged folder and
GGUF read back by transformers give the policy's logits), refused or labelled approximate elsewhere,
with the measured KL recorded; outputs never replace what qadapter did not write."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import llama_gguf_permute, random_adapter
from qadapter import objective
from qadapter.cli import app
from qadapter.errors import ConfigError
from qadapter.export import (
    EXPORT_INFO,
    export_gguf,
    export_merged,
    llama_permute,
    llama_unpermute,
    mean_kl,
    merge_plan,
    model_logits,
    policy_coefficients,
    policy_logits,
    probe_batch,
)
from qadapter.model import QAdapterModel

DIALS = [(1.0, 1.0), (1.0, 2.5), (2.0, 1.0), (0.5, 0.5), (4.0, 4.0), (0.3, 1.7)]


# ---------------------------------------------------------------------------------------------
# The math


@pytest.mark.parametrize("q_form", ["residual", "raw"])
@pytest.mark.parametrize("alpha_0, alpha_tilde", DIALS)
def test_policy_is_linear_in_the_two_passes(q_form, alpha_0, alpha_tilde):
    """(Q + α₀ log π₁)/α̃ = u·adapted + v·base logits up to a constant per state, and the plan's single model
    (LoRA ×s, logits ×(u+v)) has those logits wherever the hidden state is h_b + s·(h_a − h_b) exactly."""
    g = torch.Generator().manual_seed(0)
    adapted, base = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    policy = objective.combined_logits(objective.q_values(adapted, base, q_form), F.log_softmax(base, -1), alpha_0, alpha_tilde)
    u, v = policy_coefficients(q_form, alpha_0, alpha_tilde)
    assert torch.allclose(F.log_softmax(policy, -1), F.log_softmax(u * adapted + v * base, -1), atol=1e-5)
    plan = merge_plan(q_form, alpha_0, alpha_tilde)  # with W linear: W·(h_b + s(h_a − h_b))·c
    merged = plan.head_scale * (base + plan.lora_scale * (adapted - base))
    assert torch.allclose(F.log_softmax(policy, -1), F.log_softmax(merged, -1), atol=1e-5)
    assert plan.exact == (q_form == "residual" and alpha_0 == 1)


def test_tied_dial_is_weight_interpolation():
    """Residual Q at α₀ = α̃: logits untouched, LoRA delta scaled by 1/α₀."""
    plan = merge_plan("residual", 4.0, 4.0)
    assert (plan.lora_scale, plan.head_scale, plan.exact) == (0.25, 1.0, False)


def test_permutation_is_llama_cpps_and_transformers_undoes_it():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(0).standard_normal((24, 5)).astype(np.float32)
    assert np.array_equal(llama_permute(w, 3), llama_gguf_permute(w, 3))
    assert np.array_equal(llama_unpermute(llama_permute(w, 3), 3), w)
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(llama_permute(w, 3), 3, 3), w)


def test_mean_kl_is_zero_for_shifted_logits_and_positive_otherwise():
    logits = torch.randn(2, 3, 7)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert mean_kl(logits, logits + 5.0, mask) == pytest.approx(0.0, abs=1e-6)
    assert mean_kl(logits, torch.zeros_like(logits), mask) > 0


# ---------------------------------------------------------------------------------------------
# Merged folder


def _reference(adapter, alpha_0=None, alpha_tilde=None):
    """The true customized policy's logits on the export's probe texts, and those texts."""
    qmodel = QAdapterModel.from_pretrained(adapter, device="cpu")
    a0, at = alpha_0 or qmodel.config.alpha_0, alpha_tilde or qmodel.config.alpha_tilde
    ids, mask = probe_batch(qmodel.tokenizer)
    return policy_logits(qmodel, ids, mask, a0, at), ids, mask


def _loaded_logits(folder, ids, mask, **kwargs):
    from transformers import AutoModelForCausalLM

    return model_logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs), ids, mask)


@pytest.mark.parametrize("alpha_tilde", [1.0, 2.5])
def test_merged_export_is_exact_for_residual_q_at_alpha_0_one(tiny_model_dir, tmp_path, alpha_tilde):
    """Residual Q at α₀ = 1: the merged folder, loaded by plain transformers, gives the customized policy (at
    α̃ ≠ 1 through its scaled, untied head); the recorded and printed KL is float rounding."""
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    target, ids, mask = _reference(adapter, alpha_tilde=alpha_tilde)
    result = export_merged(adapter, tmp_path / "merged", alpha_tilde=alpha_tilde)
    loaded = _loaded_logits(tmp_path / "merged", ids, mask)
    real = mask.bool()
    assert torch.allclose(F.log_softmax(loaded, -1)[real], F.log_softmax(target, -1)[real], atol=1e-4)
    assert result.plan.exact and result.kl < 1e-7
    info = json.loads((tmp_path / "merged" / EXPORT_INFO).read_text())
    assert info["exact"] is True and info["alpha_tilde"] == alpha_tilde and info["kl_mean_per_token"] == result.kl
    assert "exactly the customized policy" in (tmp_path / "merged" / "README.md").read_text()
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_approximate_export_is_refused_unless_asked_then_labelled(tiny_model_dir, tmp_path):
    """Residual Q at α₀ = 2: refused (nothing written) without approximate; with it, labelled approximate, and the
    recorded KL is the KL of the folder as loaded against the true policy."""
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    with pytest.raises(ConfigError, match="--approximate"):
        export_merged(adapter, tmp_path / "merged", alpha_0=2.0)
    assert not (tmp_path / "merged").exists()
    result = export_merged(adapter, tmp_path / "merged", alpha_0=2.0, approximate=True)
    target, ids, mask = _reference(adapter, alpha_0=2.0)
    assert not result.plan.exact and result.kl > 1e-6
    assert mean_kl(target, _loaded_logits(tmp_path / "merged", ids, mask), mask) == pytest.approx(result.kl, rel=1e-3)
    info = json.loads((tmp_path / "merged" / EXPORT_INFO).read_text())
    assert info["exact"] is False and info["lora_scale"] == pytest.approx(0.5) and info["head_scale"] == pytest.approx(2.0)
    assert "APPROXIMATION" in (tmp_path / "merged" / "README.md").read_text()


def test_raw_q_is_never_exact(tiny_model_dir, tmp_path):
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter", q_form="raw")
    with pytest.raises(ConfigError, match="raw Q"):
        export_merged(adapter, tmp_path / "merged")


def test_merged_dtype_is_measured_as_written(tiny_model_dir, tmp_path):
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    result = export_merged(adapter, tmp_path / "merged", dtype="bfloat16")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    assert 1e-7 < result.kl < 0.05  # bf16 rounding, measured rather than hidden


def test_overwrite_replaces_only_an_export(tiny_model_dir, tmp_path):
    """An existing output needs --overwrite, which replaces a previous export and nothing else."""
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="overwrite" if not overwrite else "not a merged export"):
            export_merged(adapter, mine, overwrite=overwrite)
    assert (mine / "notes.txt").read_text() == "keep me"
    export_merged(adapter, tmp_path / "merged")
    with pytest.raises(ConfigError, match="--overwrite"):
        export_merged(adapter, tmp_path / "merged")
    export_merged(adapter, tmp_path / "merged", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged", "mine"]


# ---------------------------------------------------------------------------------------------
# GGUF


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_gguf_export_reads_back_as_measured(tiny_gguf, cache, tmp_path, gguf_type):
    """On a GGUF base: the written file loads in transformers (gguf_file=) with the template's tokenizer and chat
    template; in f32 it is the merged model exactly, and in every type its KL to the true policy is the one
    recorded in the file's metadata and printed."""
    import gguf

    adapter = random_adapter(tiny_gguf, tmp_path / "adapter")
    target, ids, mask = _reference(adapter)
    result = export_gguf(adapter, tmp_path / "out.gguf", gguf_type_name=gguf_type)
    loaded = _loaded_logits(tmp_path, ids, mask, gguf_file="out.gguf")
    assert mean_kl(target, loaded, mask) == pytest.approx(result.kl, rel=1e-3, abs=1e-9)
    if gguf_type == "f32":
        export_merged(adapter, tmp_path / "merged")
        assert torch.allclose(loaded, _loaded_logits(tmp_path / "merged", ids, mask), atol=1e-4)
        assert result.kl < 1e-7
    reader = gguf.GGUFReader(tmp_path / "out.gguf")
    assert reader.get_field("qadapter.exact").contents() is True
    assert reader.get_field("qadapter.kl_mean_per_token").contents() == pytest.approx(result.kl, rel=1e-6)
    template = gguf.GGUFReader(tiny_gguf)
    assert reader.get_field("tokenizer.chat_template").contents() == template.get_field("tokenizer.chat_template").contents()
    assert [t.name for t in reader.tensors] == [t.name for t in template.tensors]  # tied head: no output.weight


def test_approximate_gguf_writes_an_untied_head(tiny_gguf, cache, tmp_path):
    """α₀ ≠ 1 (approximate) with a head scale ≠ 1: the GGUF gains output.weight and reads back as measured."""
    import gguf

    adapter = random_adapter(tiny_gguf, tmp_path / "adapter")
    target, ids, mask = _reference(adapter, alpha_0=2.0)
    result = export_gguf(adapter, tmp_path / "out.gguf", alpha_0=2.0, approximate=True, gguf_type_name="f32")
    assert "output.weight" in [t.name for t in gguf.GGUFReader(tmp_path / "out.gguf").tensors]
    assert mean_kl(target, _loaded_logits(tmp_path, ids, mask, gguf_file="out.gguf"), mask) == pytest.approx(result.kl, rel=1e-3)


def test_gguf_needs_a_gguf_base(tiny_model_dir, tmp_path):
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    with pytest.raises(ConfigError, match="convert_hf_to_gguf.py"):
        export_gguf(adapter, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_gguf_overwrite_replaces_only_a_gguf(tiny_gguf, cache, tmp_path):
    adapter = random_adapter(tiny_gguf, tmp_path / "adapter")
    text = tmp_path / "out.gguf"
    text.write_text("not a gguf")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        export_gguf(adapter, text, overwrite=True)
    assert text.read_text() == "not a gguf"


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_export_prints_exactness_and_kl(tiny_model_dir, tmp_path):
    adapter = random_adapter(tiny_model_dir, tmp_path / "run" / "adapter")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--to", "merged", "--output", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "exact export" in result.output and "KL(customized policy ‖ export)" in result.output
    refused = CliRunner().invoke(app, ["export", str(adapter), "--to", "merged", "--output", str(tmp_path / "m2"), "--alpha-0", "2"])
    assert refused.exit_code != 0 and "--approximate" in str(refused.exception)
    approx = CliRunner().invoke(app, ["export", str(adapter), "--to", "merged", "--output", str(tmp_path / "m2"), "--alpha-0", "2", "--approximate"])
    assert approx.exit_code == 0 and "APPROXIMATE" in approx.output


def test_lora_on_a_tied_output_head_merges_without_touching_the_embeddings(tiny_model_dir, tmp_path):
    """A LoRA on lm_head, tied to the input embeddings: merged into an untied head, the embeddings unchanged."""
    from qadapter.config import QAdapterConfig
    from qadapter.model import load_base

    qm = QAdapterModel.create(load_base(str(tiny_model_dir), device="cpu"), QAdapterConfig(target_modules=["q_proj", "lm_head"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in qm.peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    qm.save_pretrained(tmp_path / "adapter")
    target, ids, mask = _reference(tmp_path / "adapter")
    result = export_merged(tmp_path / "adapter", tmp_path / "merged")
    assert result.kl < 1e-7
    loaded = _loaded_logits(tmp_path / "merged", ids, mask)
    assert torch.allclose(F.log_softmax(loaded, -1)[mask.bool()], F.log_softmax(target, -1)[mask.bool()], atol=1e-4)


def test_scaling_a_head_that_is_not_linear_is_not_called_exact(tiny_model_dir, tmp_path):
    """Where logits are not W·h (hidden_path off: soft-capping, a bias, …), scaling the head by 1/α̃ is refused as
    exact, and labelled approximate when asked for."""
    from qadapter.export import checked_head

    qmodel = QAdapterModel.from_pretrained(random_adapter(tiny_model_dir, tmp_path / "adapter"), device="cpu")
    plan = merge_plan("residual", 1.0, 2.0)
    assert checked_head(qmodel, plan, approximate=False) == plan  # the tiny Llama's logits are W·h
    qmodel.hidden_path = False
    with pytest.raises(ConfigError, match="not a plain linear map"):
        checked_head(qmodel, plan, approximate=False)
    assert not checked_head(qmodel, plan, approximate=True).exact
    assert checked_head(qmodel, merge_plan("residual", 1.0, 1.0), approximate=False).exact
