"""The Q-Adapter objective as pure tensor functions.

Everything here follows Li et al., "Q-Adapter: Customizing Pre-trained LLMs to New Preferences
with Forgetting Mitigation", arXiv 2407.03856 (ICLR 2025), Section 4: the customized policy (Eq. 7),
the soft value (Eq. 8), the token reward as a Bellman residual (Eq. 9) and the loss, Bradley–Terry
plus the χ² penalty (Eq. 10), with the paper's symbols:

    alpha_0      α₀ = λ·α₁, weight of the base log-policy log π₁ (larger: closer to the base)
    alpha_tilde  α̃, temperature of the customized policy
    gamma        γ, discount of the Bellman residual
    beta         β, weight of the χ²-style penalty on token rewards

"The reference code" is the authors' official implementation, github.com/mansicer/Q-Adapter at commit
81f908fdbdc9c22872bd1b6bf306003d507188de, file utils/q_adapter.py (``modify_forward`` computes Q, V
and the policy; ``qadapter_loss`` the loss); each mention below names it with the short hash.

Token alignment (the one place the reference code (mansicer/Q-Adapter@81f908f, utils/q_adapter.py) gets wrong, so it is spelled out once):
a sequence of ``T`` tokens has ``T - 1`` *actions*. Action ``t`` is token ``t + 1``, taken in
state ``s_t`` = tokens ``0..t``; the model's logits at position ``t`` describe it. Every
per-action tensor below therefore has length ``T - 1`` and ``action_mask[t]`` says whether
token ``t + 1`` is a response token (not prompt, not padding, not after EOS).

Only torch is imported: no model, no reduction over the batch, no ``.item()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

QForm = Literal["residual", "raw"]
ValueState = Literal["next", "current"]


def q_values(adapter_logits: torch.Tensor, base_logits: torch.Tensor, form: QForm) -> torch.Tensor:
    """Q(s, ·) over the vocabulary from the adapted and the base model's logits.

    ``raw`` (the reference code (mansicer/Q-Adapter@81f908f, utils/q_adapter.py)): Q = adapted logits. At initialisation Q equals the
    base logits, so token rewards start far from zero.
    ``residual``: Q = adapted logits − base logits. A zero LoRA gives Q ≡ 0 exactly, so the
    customized policy starts at π₁^(α₀/α̃) and, with α₀ = α̃, at the base policy itself.

    Shapes: (..., V) → (..., V).
    """
    if form == "residual":
        return adapter_logits - base_logits.detach()
    if form == "raw":
        return adapter_logits
    raise ValueError(f"q_form must be 'residual' or 'raw', got {form!r}")


def combined_logits(
    q: torch.Tensor, base_logprobs: torch.Tensor, alpha_0: float, alpha_tilde: float
) -> torch.Tensor:
    """Logits of the customized policy π̃ (arXiv 2407.03856, Eq. 7):

        π̃(a|s) ∝ exp((Q(s,a) + α₀ log π₁(a|s)) / α̃)

    ``q``: Q(s, ·); ``base_logprobs``: log π₁(·|s). Shapes: (..., V) → (..., V).
    """
    return (q + alpha_0 * base_logprobs) / alpha_tilde


def soft_value(
    q: torch.Tensor, base_logprobs: torch.Tensor, alpha_0: float, alpha_tilde: float
) -> torch.Tensor:
    """Soft state value (arXiv 2407.03856, Eq. 8):

        V(s) = α̃ · log Σ_a exp((Q(s,a) + α₀ log π₁(a|s)) / α̃)

    Shapes: (..., V) → (...). Computed with logsumexp, so it is stable for raw logits too.
    """
    return alpha_tilde * torch.logsumexp(combined_logits(q, base_logprobs, alpha_0, alpha_tilde), dim=-1)


@dataclass
class TokenTerms:
    """Per-action quantities the objective needs, all of shape (b, T-1).

    q_taken:        Q(s_t, a_t) of the action actually taken.
    values:         V(s_t) of the state the action is taken in.
    base_logp:      log π₁(a_t | s_t), for the log-policy identity and KL-style metrics.
    policy_logp:    log π̃(a_t | s_t) of the customized policy.
    action_mask:    1.0 where action t is a scored response token, else 0.0.
    """

    q_taken: torch.Tensor
    values: torch.Tensor
    base_logp: torch.Tensor
    policy_logp: torch.Tensor
    action_mask: torch.Tensor


def token_terms(
    q: torch.Tensor,
    base_logprobs: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    alpha_0: float,
    alpha_tilde: float,
) -> TokenTerms:
    """Gather the per-action terms from full-vocabulary tensors.

    ``q`` and ``base_logprobs`` are (b, T, V), indexed by position; ``input_ids`` and
    ``completion_mask`` are (b, T), with ``completion_mask`` 1 on response tokens only.
    Logits at position t score token t+1, so the first response token (scored from the last
    prompt position) is included and nothing is scored from the final position.
    """
    actions = input_ids[:, 1:].unsqueeze(-1)  # (b, T-1, 1): a_t = token t+1
    q = q[:, :-1]  # (b, T-1, V): states s_0 .. s_{T-2}
    base_logprobs = base_logprobs[:, :-1]  # (b, T-1, V)
    z = combined_logits(q, base_logprobs, alpha_0, alpha_tilde)  # (b, T-1, V)
    log_norm = torch.logsumexp(z, dim=-1)  # (b, T-1)
    return TokenTerms(
        q_taken=q.gather(-1, actions).squeeze(-1),  # (b, T-1)
        values=alpha_tilde * log_norm,  # (b, T-1), Eq. 8
        base_logp=base_logprobs.gather(-1, actions).squeeze(-1),  # (b, T-1)
        policy_logp=z.gather(-1, actions).squeeze(-1) - log_norm,  # (b, T-1)
        action_mask=completion_mask[:, 1:].to(q.dtype),  # (b, T-1)
    )


def token_rewards(
    q_taken: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    gamma: float,
    value_state: ValueState = "next",
) -> torch.Tensor:
    """Implicit token rewards r₂ (arXiv 2407.03856, Eq. 9, the Bellman residual):

        value_state="next":    r₂(s_t, a_t) = Q(s_t, a_t) − γ·V(s_{t+1}),  V = 0 after the last response token
        value_state="current": r₂(s_t, a_t) = Q(s_t, a_t) − γ·V(s_t)      (the choice of the reference code (mansicer/Q-Adapter@81f908f, utils/q_adapter.py))

    With γ = 1 the two sequence sums differ by V of the first response state only, which a
    chosen and a rejected response to the same prompt share, so Bradley–Terry margins agree.
    A response truncated to ``max_length`` is treated like one that ended there (V = 0 after its last
    kept token), the same for chosen and rejected.
    All inputs and the result are (b, T-1); masked actions get reward 0. Response actions are
    contiguous in each row, so "the next state is still in the response" is the next mask bit,
    for left and right padding alike.
    """
    if value_state == "next":
        next_mask = F.pad(action_mask[:, 1:], (0, 1))  # (b, T-1): action t+1 is scored
        baseline = torch.where(next_mask.bool(), F.pad(values[:, 1:], (0, 1)), torch.zeros_like(values))  # (b, T-1): V(s_{t+1}) or 0 at the end
    elif value_state == "current":
        baseline = values
    else:
        raise ValueError(f"value_state must be 'next' or 'current', got {value_state!r}")
    # where, not multiply: a non-finite value at an unscored position must not turn into NaN
    return torch.where(action_mask.bool(), q_taken - gamma * baseline, torch.zeros_like(q_taken))


def sequence_rewards(rewards: torch.Tensor, action_mask: torch.Tensor, length_normalize: bool = False) -> torch.Tensor:
    """Sequence reward R = Σ_t r₂(s_t, a_t) over response actions, (b, T-1) → (b,).

    ``length_normalize`` divides each sequence by its *own* number of response actions (the reference code (mansicer/Q-Adapter@81f908f, utils/q_adapter.py)
    divides by the padded length of the batch, which makes a sequence's reward depend on its batch-mates).
    """
    total = (rewards * action_mask).sum(-1)  # (b,)
    if length_normalize:
        return total / action_mask.sum(-1).clamp(min=1.0)
    return total


def reward_penalty(rewards: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """χ²-style regularizer, the β term of arXiv 2407.03856 Eq. 10: mean of r₂² over each sequence's
    response actions, (b, T-1) → (b,). Keeps implicit rewards small so Q stays a residual.

    Departs from the reference code (mansicer/Q-Adapter@81f908f, utils/q_adapter.py) in its weighting, on purpose: ``qadapter_loss`` there pools r₂²
    over every response token of the whole batch (β·Σ r₂²·mask / Σ mask), so a long response weighs
    more and a pair's penalty depends on its batch-mates; here each sequence's own mean, so every pair
    has its own loss (:func:`pair_objective` averages chosen and rejected). Both estimate the mean
    squared token reward; on a batch of equally long responses they agree exactly."""
    return (rewards.square() * action_mask).sum(-1) / action_mask.sum(-1).clamp(min=1.0)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry negative log-likelihood −log σ(R(w) − R(l)), per pair: (B,), (B,) → (B,)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


@dataclass
class PairObjective:
    """Per-pair outputs of :func:`pair_objective`, each of shape (B,)."""

    loss: torch.Tensor  # bt_loss + beta * penalty, what the optimizer minimizes
    bt_loss: torch.Tensor
    penalty: torch.Tensor  # mean r₂² of chosen and rejected
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def pair_objective(
    terms: TokenTerms,
    chosen_index: torch.Tensor,
    rejected_index: torch.Tensor,
    *,
    gamma: float,
    beta: float,
    value_state: ValueState = "next",
    length_normalize: bool = False,
) -> PairObjective:
    """The Q-Adapter loss of arXiv 2407.03856 Eq. 10 for preference pairs.

    ``terms`` holds b scored sequences; pair i compares sequence ``chosen_index[i]`` with
    ``rejected_index[i]`` (a sequence can appear in several pairs, e.g. one chosen response
    against several rejected ones, and is then scored once).

        loss_i = −log σ(R(w_i) − R(l_i)) + β · ½ (mean r₂²(w_i) + mean r₂²(l_i))
    """
    rewards = token_rewards(terms.q_taken, terms.values, terms.action_mask, gamma, value_state)  # (b, T-1)
    seq = sequence_rewards(rewards, terms.action_mask, length_normalize)  # (b,)
    pen = reward_penalty(rewards, terms.action_mask)  # (b,)
    chosen, rejected = seq[chosen_index], seq[rejected_index]  # (B,), (B,)
    bt = bradley_terry_loss(chosen, rejected)
    penalty = 0.5 * (pen[chosen_index] + pen[rejected_index])
    return PairObjective(
        loss=bt + beta * penalty,
        bt_loss=bt,
        penalty=penalty,
        chosen_rewards=chosen.detach(),
        rejected_rewards=rejected.detach(),
    )


def advantage_margin(
    terms: TokenTerms, chosen_index: torch.Tensor, rejected_index: torch.Tensor, alpha_0: float, alpha_tilde: float
) -> torch.Tensor:
    """The Bradley–Terry margin from log-policies alone (γ = 1, no length normalisation):

        Q(s_t,a_t) − V(s_t) = α̃ log π̃(a_t|s_t) − α₀ log π₁(a_t|s_t)

    (from π̃ = exp((Q + α₀ log π₁ − V)/α̃)), and the Bellman sum equals the sum of these
    advantages plus V of the first response state, which chosen and rejected share. So

        R(w) − R(l) = Σ_w (α̃ log π̃ − α₀ log π₁) − Σ_l (α̃ log π̃ − α₀ log π₁),    (B,)

    which never forms V itself. With the residual form and α₀ = α̃ = β_DPO this is exactly
    DPO's implicit-reward margin.
    """
    adv = (alpha_tilde * terms.policy_logp - alpha_0 * terms.base_logp) * terms.action_mask  # (b, T-1)
    total = adv.sum(-1)  # (b,)
    return total[chosen_index] - total[rejected_index]


def kl_from_logits(policy_logits: torch.Tensor, base_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(π̃ ‖ π₁) = Σ_a π̃(a|s) (log π̃(a|s) − log π₁(a|s)) per state: (..., V) → (...).

    How far the customized policy moved from the base: the forgetting the dial trades off."""
    log_policy = F.log_softmax(policy_logits, dim=-1)
    return (log_policy.exp() * (log_policy - base_logprobs)).sum(-1)
