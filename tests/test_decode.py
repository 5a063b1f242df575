"""Decoding with the customized policy: limits with a known answer, and cache = recomputation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from qadapter import objective
from qadapter.config import DecodeConfig, QAdapterConfig
from qadapter.decode import encode_prompts, eos_ids, generate, generate_ids, token_rows
from qadapter.model import QAdapterModel, load_base
from qadapter.sampling import sample_next, top_k_filter, top_p_filter

from conftest import engine_rows, reference_generate


@pytest.fixture()
def qmodel(tiny_model_dir):
    qm = QAdapterModel.create(load_base(str(tiny_model_dir), device="cpu"), QAdapterConfig(alpha_0=0.5, alpha_tilde=1.5, lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in qm.peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return qm


def _recomputed_logits(qmodel, ids, mask, alpha_0, alpha_tilde):
    """Customized logits at the last position, computed from scratch without any cache."""
    q, base_logprobs = qmodel.q_and_base_logprobs(ids, mask)
    return objective.combined_logits(q[:, -1], base_logprobs[:, -1], alpha_0, alpha_tilde)


@pytest.mark.parametrize("hidden_path", [True, False])
@pytest.mark.parametrize("q_form,alpha_0,alpha_tilde", [("residual", 0.5, 1.5), ("residual", 1.0, 1.5), ("raw", 0.5, 1.0)])
def test_cached_greedy_equals_recomputation(qmodel, q_form, alpha_0, alpha_tilde, hidden_path):
    """Greedy decoding (one batched forward, one KV cache; a single pass at residual α₀ = 1; combined hidden
    states projected once, or combined logits) picks, at every step, the argmax of the customized logits
    recomputed from scratch with two separate passes."""
    qmodel.config = qmodel.config.replace(q_form=q_form)
    qmodel.hidden_path = hidden_path
    prompts = ["tell me about the cat", "why is the dog so big and red"]
    ids, mask = encode_prompts(qmodel.tokenizer, prompts)
    out = generate_ids(qmodel, ids, mask, DecodeConfig(max_new_tokens=6, alpha_0=alpha_0, alpha_tilde=alpha_tilde))
    with torch.no_grad():
        for step in range(out.shape[1]):
            full = torch.cat([ids, out[:, :step]], 1)
            full_mask = torch.cat([mask, torch.ones(ids.shape[0], step, dtype=torch.long)], 1)
            logits = _recomputed_logits(qmodel, full, full_mask, alpha_0, alpha_tilde)
            live = ~torch.isin(out[:, :step], torch.tensor([qmodel.tokenizer.eos_token_id])).any(1)
            assert torch.equal(logits.argmax(-1)[live], out[live, step])


def test_engine_greedy_equals_reference_decoder(qmodel, float32):
    """The engine (every pass a row of one batched forward, one KV cache, left padding, rows ending at
    different steps) decodes greedily what the plain reference decoder does, prompt by prompt."""
    prompts = ["tell me about the cat", "why is the dog so big and red", "hello"]
    ids, mask = encode_prompts(qmodel.tokenizer, prompts)
    out = generate_ids(qmodel, ids, mask, DecodeConfig(max_new_tokens=8))
    expected = [reference_generate(qmodel, row, 8) for row in token_rows(qmodel.tokenizer, prompts)]
    assert engine_rows(out, eos_ids(qmodel)) == expected


def test_batched_equals_one_by_one(qmodel):
    """Left padding in a batch changes no row's greedy output."""
    prompts = ["hello", "tell me about the big red dog and the small cat"]
    together = generate(qmodel, prompts, DecodeConfig(max_new_tokens=5))
    alone = [generate(qmodel, p, DecodeConfig(max_new_tokens=5))[0] for p in prompts]
    assert together == alone


def test_zero_q_is_base_at_temperature(tiny_model_dir):
    """With a fresh adapter (Q ≡ 0) the customized distribution is the base's at temperature α̃/α₀."""
    qm = QAdapterModel.create(load_base(str(tiny_model_dir), device="cpu"), QAdapterConfig(alpha_0=0.5, alpha_tilde=2.0))
    ids, mask = encode_prompts(qm.tokenizer, ["what is the answer"])
    with torch.no_grad():
        customized = _recomputed_logits(qm, ids, mask, 0.5, 2.0)
        base = qm.base_logits(ids, mask)[:, -1]
    assert_close(torch.softmax(customized, -1), torch.softmax(base / (2.0 / 0.5), -1), atol=1e-6, rtol=1e-5)


def test_dial_override_changes_policy_without_retraining(qmodel):
    """alpha_0 / alpha_tilde given at generation time replace the trained ones; the 'base' policy ignores the adapter."""
    ids, mask = encode_prompts(qmodel.tokenizer, ["tell me something good"])
    strong = generate_ids(qmodel, ids, mask, DecodeConfig(max_new_tokens=8, alpha_0=1000.0, alpha_tilde=1000.0))
    base = generate_ids(qmodel, ids, mask, DecodeConfig(max_new_tokens=8), policy="base")
    assert torch.equal(strong, base)  # α₀ = α̃ → ∞: Q/α̃ vanishes, π̃ → π₁


def test_sampling_is_seeded(qmodel):
    """The same seed reproduces a sampled completion."""
    cfg = DecodeConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert generate(qmodel, "hello there", cfg) == generate(qmodel, "hello there", cfg)


def test_stops_at_eos(qmodel, monkeypatch):
    """A row that emits EOS is padded afterwards, and decoding stops once every row has."""
    eos, pad = qmodel.tokenizer.eos_token_id, qmodel.tokenizer.pad_token_id
    script = iter([[5, eos], [eos, 6], [7, 8], [9, 9]])  # row 1 ends at step 0, row 0 at step 1
    monkeypatch.setattr("qadapter.decode.sample_next", lambda logits, **kw: torch.tensor(next(script)))
    ids, mask = encode_prompts(qmodel.tokenizer, ["hello", "the cat"])
    out = generate_ids(qmodel, ids, mask, DecodeConfig(max_new_tokens=4))
    assert out.tolist() == [[5, eos], [eos, pad]]


def test_top_p_keeps_smallest_nucleus():
    """p = (0.5, 0.3, 0.2): top_p 0.6 keeps the first two, 0.5 keeps one, 1.0 keeps all."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert torch.isfinite(top_p_filter(logits, 0.6)).tolist() == [[True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_top_k_keeps_the_k_most_likely_and_comes_before_top_p():
    """top_k 2 keeps the two largest logits per row, 0 keeps all; in sampling it applies before top_p, which then sees
    the renormalised pair: noise favouring the third token cannot reach it."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.1, 0.2, 0.3]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[False, True, True, False], [False, False, True, True]]
    assert torch.isfinite(top_k_filter(logits, 0)).all()
    noise = torch.tensor([[0.0, 0.0, 0.0, 50.0], [50.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=1.0, top_k=2, noise=noise).tolist() == [1, 3]


def test_sample_with_injected_noise_is_gumbel_argmax():
    """With noise given, sampling is argmax(logits/T + noise); temperature 0 is greedy."""
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    assert sample_next(logits, temperature=0.0).item() == 1
    assert sample_next(logits, temperature=1.0, noise=torch.tensor([[5.0, 0.0, 0.0]])).item() == 0
    with pytest.raises(ValueError):
        sample_next(logits, temperature=-1.0)


def test_sampling_matches_distribution():
    """Empirical frequencies of 20k samples match softmax(logits/T) within 2%."""
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=2.0, generator=g)
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert_close(freq, F.softmax(torch.tensor([0.0, 1.0, 2.0]) / 2.0, -1), atol=0.02, rtol=0)


def test_min_new_tokens_suppresses_eos(qmodel, monkeypatch):
    """Before min_new_tokens, EOS gets probability 0 however the policy scores it."""
    eos = qmodel.tokenizer.eos_token_id
    seen = []

    def greedy(logits, **kw):
        seen.append(torch.isinf(logits[:, eos]).all().item())
        return logits.argmax(-1)

    monkeypatch.setattr("qadapter.decode.sample_next", greedy)
    ids, mask = encode_prompts(qmodel.tokenizer, ["hello"])
    out = generate_ids(qmodel, ids, mask, DecodeConfig(max_new_tokens=5, min_new_tokens=3))
    assert seen[:3] == [True, True, True] and not any(seen[3:])
    assert eos not in out[0, :3].tolist()
