"""The objective against the equations of arXiv 2407.03856 (hand-worked numbers and a brute-force reference)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from qadapter import objective as obj
from qadapter.preference_eval import preference_accuracy


def _random_case(seed: int = 0, b: int = 4, T: int = 7, V: int = 11, scale: float = 1.0):
    """Random Q and base log-probs with ragged, right-padded responses after a 2-token prompt."""
    g = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(b, T, V, generator=g, dtype=torch.float64)).requires_grad_()
    base_logprobs = torch.log_softmax(torch.randn(b, T, V, generator=g, dtype=torch.float64), -1)
    ids = torch.randint(0, V, (b, T), generator=g)
    completion = torch.zeros(b, T, dtype=torch.long)
    for row, end in enumerate([T, T - 1, T - 2, T][:b]):
        completion[row, 2:end] = 1  # prompt = tokens 0..1, response = 2..end-1, then padding
    return q, base_logprobs, ids, completion


def _brute_force_loss(q, base_logprobs, ids, completion, chosen, rejected, *, alpha_0, alpha_tilde, gamma, beta):
    """Eq. 8-10 written out with Python loops, one action at a time."""
    rewards, penalties = [], []
    for row in range(ids.shape[0]):
        actions = [t for t in range(ids.shape[1] - 1) if completion[row, t + 1]]  # state t takes token t+1
        total, squares = 0.0, 0.0
        for t in actions:
            q_sa = q[row, t, ids[row, t + 1]]
            if t + 1 in actions:
                z = (q[row, t + 1] + alpha_0 * base_logprobs[row, t + 1]) / alpha_tilde
                v_next = alpha_tilde * torch.logsumexp(z, 0)
            else:
                v_next = 0.0  # V = 0 after the last response token
            r = q_sa - gamma * v_next
            total = total + r
            squares = squares + r**2
        rewards.append(total)
        penalties.append(squares / len(actions))
    losses = []
    for w, l in zip(chosen, rejected):
        bt = -torch.nn.functional.logsigmoid(rewards[w] - rewards[l])
        losses.append(bt + beta * 0.5 * (penalties[w] + penalties[l]))
    return torch.stack(losses)


@pytest.mark.parametrize("alpha_0,alpha_tilde,gamma,beta", [(1.0, 1.0, 1.0, 0.1), (0.01, 1.0, 1.0, 0.1), (0.5, 2.0, 0.9, 0.3)])
def test_loss_and_gradient_match_brute_force(alpha_0, alpha_tilde, gamma, beta):
    """Vectorised loss and its gradient w.r.t. Q equal the loop-by-loop reference of Eq. 8-10."""
    q, base_logprobs, ids, completion = _random_case()
    chosen, rejected = torch.tensor([0, 2]), torch.tensor([1, 3])
    terms = obj.token_terms(q, base_logprobs, ids, completion, alpha_0, alpha_tilde)
    out = obj.pair_objective(terms, chosen, rejected, gamma=gamma, beta=beta)
    (grad,) = torch.autograd.grad(out.loss.sum(), q)
    reference = _brute_force_loss(q, base_logprobs, ids, completion, [0, 2], [1, 3], alpha_0=alpha_0, alpha_tilde=alpha_tilde, gamma=gamma, beta=beta)
    (ref_grad,) = torch.autograd.grad(reference.sum(), q)
    assert_close(out.loss, reference, rtol=1e-10, atol=1e-10)
    assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)


def test_soft_value_hand_worked():
    """π₁ = (1/2, 1/4, 1/4), Q = 0: α₀ = α̃ = 1 gives V = log Σπ₁ = 0; α₀ = 2 gives V = log Σπ₁² = log(3/8)."""
    base = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    q = torch.zeros(3)
    assert_close(obj.soft_value(q, base, 1.0, 1.0), torch.tensor(0.0), atol=1e-7, rtol=0)
    assert_close(obj.soft_value(q, base, 2.0, 1.0), torch.tensor(math.log(0.375)), atol=1e-6, rtol=0)
    # α̃ = 2, α₀ = 1, Q = (2, 0, 0): V = 2 log(½e + ¼ + ¼)... written out: 2·log Σ exp((Q + log π₁)/2)
    q2 = torch.tensor([2.0, 0.0, 0.0])
    expected = 2 * math.log(math.exp((2 + math.log(0.5)) / 2) + 2 * math.exp(math.log(0.25) / 2))
    assert_close(obj.soft_value(q2, base, 1.0, 2.0), torch.tensor(expected), atol=1e-6, rtol=0)


def test_token_alignment():
    """Logits at position t score token t+1; the first response token is scored from the last prompt position."""
    V = 5
    ids = torch.tensor([[0, 1, 2, 3, 4]])
    completion = torch.tensor([[0, 0, 1, 1, 0]])  # prompt = (0, 1), response = (2, 3), then padding
    q = torch.zeros(1, 5, V)
    for t in range(4):
        q[0, t, ids[0, t + 1]] = 10.0 * (t + 1)  # mark the taken action at each state
    terms = obj.token_terms(q, torch.full((1, 5, V), -math.log(V)), ids, completion, 1.0, 1.0)
    assert terms.action_mask.tolist() == [[0.0, 1.0, 1.0, 0.0]]  # actions 1 and 2 = tokens 2 and 3
    assert terms.q_taken.tolist() == [[10.0, 20.0, 30.0, 40.0]]


def test_next_value_is_zero_after_last_response_token():
    """r₂ at the last response action is Q alone; earlier ones subtract γ·V of the next state."""
    q_taken = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    values = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    r = obj.token_rewards(q_taken, values, mask, gamma=0.5, value_state="next")
    assert r.tolist() == [[0.0, 2.0 - 0.5 * 30.0, 3.0, 0.0]]
    r_cur = obj.token_rewards(q_taken, values, mask, gamma=0.5, value_state="current")
    assert r_cur.tolist() == [[0.0, 2.0 - 0.5 * 20.0, 3.0 - 0.5 * 30.0, 0.0]]


def test_left_and_right_padding_give_same_rewards():
    """Shifting a row's tokens to the right end (left padding) leaves every per-sequence quantity unchanged."""
    q, base_logprobs, ids, completion = _random_case(seed=3)
    q = q.detach()
    rows = []
    for row in range(ids.shape[0]):
        n = int(completion[row].nonzero().max()) + 1  # real length of this row
        shift = ids.shape[1] - n
        rows.append((torch.roll(q[row], shift, 0), torch.roll(base_logprobs[row], shift, 0), torch.roll(ids[row], shift, 0), torch.roll(completion[row], shift, 0)))
    ql, bl, il, cl = (torch.stack(x) for x in zip(*rows))
    for value_state in ("next", "current"):
        right = obj.pair_objective(obj.token_terms(q, base_logprobs, ids, completion, 0.7, 1.3), torch.tensor([0]), torch.tensor([1]), gamma=1.0, beta=0.1, value_state=value_state)
        left = obj.pair_objective(obj.token_terms(ql, bl, il, cl, 0.7, 1.3), torch.tensor([0]), torch.tensor([1]), gamma=1.0, beta=0.1, value_state=value_state)
        assert_close(left.loss, right.loss, rtol=1e-12, atol=1e-12)


def test_masked_positions_change_nothing():
    """Changing Q and π₁ wherever no response action is taken (prompt states, padding) leaves the loss unchanged."""
    q, base_logprobs, ids, completion = _random_case(seed=4)
    q = q.detach()
    terms = obj.token_terms(q, base_logprobs, ids, completion, 1.0, 1.0)
    loss = obj.pair_objective(terms, torch.tensor([0, 2]), torch.tensor([1, 3]), gamma=1.0, beta=0.1).loss
    idle = torch.zeros(ids.shape, dtype=torch.bool)
    idle[:, :-1] = completion[:, 1:] == 0  # states whose action is not a response token
    idle[:, -1] = True  # the last position takes no action at all
    noisy_q = torch.where(idle.unsqueeze(-1), q + 100 * torch.randn_like(q), q)
    noisy_base = torch.where(idle.unsqueeze(-1), torch.log_softmax(torch.randn_like(q), -1), base_logprobs)
    noisy_ids = torch.where(completion.bool(), ids, torch.randint_like(ids, 0, q.shape[-1]))
    noisy_ids[:, :2] = ids[:, :2]  # prompt tokens change the states, so keep them
    noisy = obj.token_terms(noisy_q, noisy_base, noisy_ids, completion, 1.0, 1.0)
    assert_close(obj.pair_objective(noisy, torch.tensor([0, 2]), torch.tensor([1, 3]), gamma=1.0, beta=0.1).loss, loss)


def _shared_prompt_case(seed: int, scale: float = 1.0):
    q, base_logprobs, ids, completion = _random_case(seed=seed, scale=scale)
    q = q.detach()
    # pairs (0,1) and (2,3) share their prompt tokens and prompt-state Q/π₁, as same-prompt pairs do
    for w, l in ((0, 1), (2, 3)):
        ids[l, :2], q[l, :2], base_logprobs[l, :2] = ids[w, :2], q[w, :2], base_logprobs[w, :2]
    return q, base_logprobs, ids, completion


def test_bellman_margin_equals_log_policy_identity():
    """γ = 1: R(w) − R(l) = Σ_w(α̃ log π̃ − α₀ log π₁) − Σ_l(…), since Q − V(s) = α̃ log π̃ − α₀ log π₁."""
    q, base_logprobs, ids, completion = _shared_prompt_case(seed=5, scale=5.0)
    for alpha_0, alpha_tilde in [(1.0, 1.0), (0.01, 1.0), (2.0, 0.5)]:
        terms = obj.token_terms(q, base_logprobs, ids, completion, alpha_0, alpha_tilde)
        out = obj.pair_objective(terms, torch.tensor([0, 2]), torch.tensor([1, 3]), gamma=1.0, beta=0.0)
        margin = obj.advantage_margin(terms, torch.tensor([0, 2]), torch.tensor([1, 3]), alpha_0, alpha_tilde)
        # chosen and rejected share prompt tokens and hence V of the first response state
        shared = terms.values[:, 1]
        assert_close(shared[[0, 2]], shared[[1, 3]])
        assert_close(margin, out.chosen_rewards - out.rejected_rewards, rtol=1e-9, atol=1e-9)


def test_next_and_current_value_states_relate_by_first_value():
    """γ = 1: R_next − R_current = V(first response state) per sequence, so BT margins agree."""
    q, base_logprobs, ids, completion = _shared_prompt_case(seed=6)
    terms = obj.token_terms(q, base_logprobs, ids, completion, 0.5, 1.0)
    r_next = obj.sequence_rewards(obj.token_rewards(terms.q_taken, terms.values, terms.action_mask, 1.0, "next"), terms.action_mask)
    r_cur = obj.sequence_rewards(obj.token_rewards(terms.q_taken, terms.values, terms.action_mask, 1.0, "current"), terms.action_mask)
    assert_close(r_next - r_cur, terms.values[:, 1])  # action 1 (token 2) is the first response action
    assert_close(r_next[[0, 2]] - r_next[[1, 3]], r_cur[[0, 2]] - r_cur[[1, 3]])


def test_length_normalization_uses_each_sequence_own_length():
    """Per-sample mean: a row's reward does not change when its batch gets wider padding."""
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert obj.sequence_rewards(rewards, mask, length_normalize=True).tolist() == [2.0, 4.0]
    wider = obj.sequence_rewards(torch.nn.functional.pad(rewards, (0, 5)), torch.nn.functional.pad(mask, (0, 5)), length_normalize=True)
    assert wider.tolist() == [2.0, 4.0]
    assert obj.sequence_rewards(rewards, mask).tolist() == [6.0, 4.0]


def test_residual_q_at_zero_gives_zero_rewards_and_margin():
    """Residual form with a zero adapter: Q = 0, so with α₀ = α̃ (any value) V = α lse(log π₁) = 0, r₂ = 0, margin 0, loss log 2."""
    _, base_logprobs, ids, completion = _random_case(seed=7)
    logits = torch.randn(base_logprobs.shape, dtype=torch.float64)
    q = obj.q_values(logits, logits, "residual")
    for alpha in (1.0, 0.1, 3.0):
        terms = obj.token_terms(q, base_logprobs, ids, completion, alpha, alpha)
        out = obj.pair_objective(terms, torch.tensor([0, 2]), torch.tensor([1, 3]), gamma=1.0, beta=0.1)
        assert_close(out.chosen_rewards, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
        assert_close(out.loss, torch.full((2,), math.log(2), dtype=torch.float64), atol=1e-12, rtol=0)


def test_raw_q_starts_far_from_zero():
    """Raw form: Q equals the base logits at initialisation, so sequence rewards start tens of nats apart."""
    g = torch.Generator().manual_seed(0)
    base_logits = 8 * torch.randn(2, 40, 50, generator=g)
    ids = torch.randint(0, 50, (2, 40), generator=g)
    completion = torch.zeros(2, 40, dtype=torch.long)
    completion[:, 5:] = 1
    q = obj.q_values(base_logits, base_logits, "raw")
    terms = obj.token_terms(q, torch.log_softmax(base_logits, -1), ids, completion, 0.01, 1.0)
    out = obj.pair_objective(terms, torch.tensor([0]), torch.tensor([1]), gamma=1.0, beta=0.1)
    assert (out.chosen_rewards - out.rejected_rewards).abs().item() > 10
    assert out.penalty.item() > 10


def test_residual_at_unit_alphas_is_the_adapted_model():
    """Residual form, α₀ = α̃ = 1: (Q + log π₁) = adapted logits − lse(base), so π̃ = softmax(adapted logits)."""
    adapted, base = torch.randn(3, 20), torch.randn(3, 20)
    z = obj.combined_logits(obj.q_values(adapted, base, "residual"), torch.log_softmax(base, -1), 1.0, 1.0)
    assert_close(torch.log_softmax(z, -1), torch.log_softmax(adapted, -1), atol=1e-5, rtol=0)


def test_residual_small_alpha_0_is_nearly_uniform():
    """Residual form at the reference α₀ = 0.01, α̃ = 1, Q = 0: π̃ ∝ π₁^0.01, almost uniform (why α₀ must be near α̃ there)."""
    base = torch.log_softmax(5 * torch.randn(1000), -1)
    z = obj.combined_logits(torch.zeros(1000), base, 0.01, 1.0)
    p = torch.softmax(z, -1)
    entropy = -(p * p.log()).sum()
    assert entropy > 0.99 * math.log(1000)


def test_raw_small_alpha_0_is_reference_free_likelihood_margin():
    """Raw form, α̃ = 1: as α₀ → 0 the margin tends to Σ log softmax(adapted) over chosen minus rejected,
    with a gap linear in α₀ (10× smaller α₀, about 10× smaller gap)."""
    g = torch.Generator().manual_seed(1)
    adapted, base = 3 * torch.randn(2, 12, 30, generator=g, dtype=torch.float64), 3 * torch.randn(2, 12, 30, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 30, (2, 12), generator=g)
    completion = torch.zeros(2, 12, dtype=torch.long)
    completion[:, 3:] = 1
    loglik = torch.log_softmax(adapted, -1)[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    loglik = (loglik * completion[:, 1:]).sum(-1)
    gaps = []
    for alpha_0 in (0.01, 0.001):
        terms = obj.token_terms(obj.q_values(adapted, base, "raw"), torch.log_softmax(base, -1), ids, completion, alpha_0, 1.0)
        margin = obj.advantage_margin(terms, torch.tensor([0]), torch.tensor([1]), alpha_0, 1.0)
        gaps.append(abs(margin.item() - (loglik[0] - loglik[1]).item()))
    assert gaps[0] < 0.5 and 7 < gaps[0] / gaps[1] < 13


def test_zero_q_policy_is_base_at_temperature():
    """Q = 0: π̃ ∝ π₁^(α₀/α̃), i.e. the base policy at temperature α̃/α₀."""
    base_logits = torch.randn(4, 9)
    z = obj.combined_logits(torch.zeros(4, 9), torch.log_softmax(base_logits, -1), 0.5, 2.0)
    assert_close(torch.softmax(z, -1), torch.softmax(base_logits / (2.0 / 0.5), -1))


def test_bradley_terry_and_accuracy_hand_worked():
    """−log σ(0) = log 2, −log σ(2) = log(1 + e⁻²); accuracy 1/0/½ for win/loss/tie (|margin| <= 1e-3)."""
    chosen, rejected = torch.tensor([1.0, 3.0, 0.0, 1e-4, 0.01]), torch.tensor([1.0, 1.0, 2.0, 0.0, 0.0])
    assert_close(obj.bradley_terry_loss(chosen[:3], rejected[:3]), torch.tensor([math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))]))
    assert preference_accuracy(chosen, rejected).tolist() == [0.5, 1.0, 0.0, 0.5, 1.0]


def test_penalty_hand_worked():
    """mean r₂² over each row's own response actions: (1 + 4 + 9)/3 and 16/1."""
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert_close(obj.reward_penalty(rewards, mask), torch.tensor([14 / 3, 16.0]))


def test_shared_sequences_scored_once_equal_duplicated_rows():
    """One chosen row shared by two pairs gives the same per-pair loss as duplicating that row."""
    q, base_logprobs, ids, completion = _shared_prompt_case(seed=8)
    ids[2, :2], q[2, :2], base_logprobs[2, :2] = ids[0, :2], q[0, :2], base_logprobs[0, :2]
    terms = obj.token_terms(q, base_logprobs, ids, completion, 1.0, 1.0)
    shared = obj.pair_objective(terms, torch.tensor([0, 0]), torch.tensor([1, 2]), gamma=1.0, beta=0.1)
    dup = torch.tensor([0, 1, 0, 2])
    terms_dup = obj.token_terms(q[dup], base_logprobs[dup], ids[dup], completion[dup], 1.0, 1.0)
    duplicated = obj.pair_objective(terms_dup, torch.tensor([0, 2]), torch.tensor([1, 3]), gamma=1.0, beta=0.1)
    assert_close(shared.loss, duplicated.loss)


def test_large_raw_logits_stay_finite():
    """Raw logits in the thousands: values use logsumexp, so loss and gradient stay finite in float32."""
    q, base_logprobs, ids, completion = _random_case(seed=9, scale=3000.0)
    q = q.detach().float().requires_grad_()
    terms = obj.token_terms(q, base_logprobs.float(), ids, completion, 0.01, 1.0)
    loss = obj.pair_objective(terms, torch.tensor([0, 2]), torch.tensor([1, 3]), gamma=1.0, beta=0.1).loss.sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all()


def test_invalid_options_raise():
    """Unknown q_form / value_state are rejected with the accepted values in the message."""
    with pytest.raises(ValueError, match="residual"):
        obj.q_values(torch.zeros(1), torch.zeros(1), "weird")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="next"):
        obj.token_rewards(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 1.0, "later")  # type: ignore[arg-type]
