"""The hidden-state path equals the full-logits reference: values, gradients, and the loss built on them."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from qadapter import objective as obj
from qadapter.objective_hidden import chunked_logsumexp, token_terms_from_hidden


def _case(seed=0, b=3, T=9, d=16, V=50):
    g = torch.Generator().manual_seed(seed)
    h_a = torch.randn(b, T, d, generator=g, dtype=torch.float64).requires_grad_()
    h_b = torch.randn(b, T, d, generator=g, dtype=torch.float64)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (b, T), generator=g)
    completion = torch.zeros(b, T, dtype=torch.long)
    for row, end in enumerate([T, T - 2, T - 1]):
        completion[row, 3:end] = 1
    return h_a, h_b, weight, ids, completion


@pytest.mark.parametrize("q_form,alpha_0,alpha_tilde", [("residual", 1.0, 1.0), ("residual", 0.3, 2.0), ("raw", 0.01, 1.0), ("raw", 1.5, 0.7)])
def test_terms_and_gradients_match_full_logits(q_form, alpha_0, alpha_tilde):
    """Every scored term and d(loss)/d(h_adapter) agree with token_terms on materialised logits."""
    h_a, h_b, weight, ids, completion = _case()
    fast = token_terms_from_hidden(h_a, h_b, weight, ids, completion, q_form=q_form, alpha_0=alpha_0, alpha_tilde=alpha_tilde, chunk=4)
    a_logits, b_logits = h_a @ weight.T, h_b @ weight.T
    ref = obj.token_terms(obj.q_values(a_logits, b_logits, q_form), torch.log_softmax(b_logits, -1), ids, completion, alpha_0, alpha_tilde)
    mask = ref.action_mask.bool()
    for name in ("q_taken", "values", "base_logp", "policy_logp"):
        assert_close(getattr(fast, name)[mask].double(), getattr(ref, name)[mask], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(fast.action_mask, ref.action_mask.float())
    chosen, rejected = torch.tensor([0]), torch.tensor([1])
    for value_state in ("next", "current"):
        loss_fast = obj.pair_objective(fast, chosen, rejected, gamma=0.9, beta=0.2, value_state=value_state).loss.sum()
        loss_ref = obj.pair_objective(ref, chosen, rejected, gamma=0.9, beta=0.2, value_state=value_state).loss.sum()
        (g_fast,) = torch.autograd.grad(loss_fast, h_a, retain_graph=True)
        (g_ref,) = torch.autograd.grad(loss_ref, h_a, retain_graph=True)
        assert_close(loss_fast.double(), loss_ref, rtol=1e-5, atol=1e-5)
        assert_close(g_fast.double(), g_ref, rtol=1e-4, atol=1e-5)


def test_chunked_logsumexp_forward_and_backward():
    """Chunking changes nothing: values and gradients (hidden and weight) equal torch.logsumexp on full logits."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(13, generator=g, dtype=torch.float64)
    fast = chunked_logsumexp(h, w, scale=0.5, chunk=5)
    ref = torch.logsumexp(0.5 * (h @ w.T), -1)
    assert_close(fast.double(), ref, rtol=1e-6, atol=1e-6)
    gh, gw = torch.autograd.grad((fast.double() * upstream).sum(), (h, w))
    rh, rw = torch.autograd.grad((ref * upstream).sum(), (h, w))
    assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def test_residual_zero_adapter_gives_zero_rewards():
    """h_a = h_b (a fresh residual adapter) with α₀ = α̃: Q = 0 and V ≈ 0 on the hidden path too."""
    _, h_b, weight, ids, completion = _case(seed=2)
    terms = token_terms_from_hidden(h_b.clone(), h_b, weight, ids, completion, q_form="residual", alpha_0=0.5, alpha_tilde=0.5)
    assert terms.q_taken.abs().max() == 0
    assert terms.values.abs().max() < 1e-6
