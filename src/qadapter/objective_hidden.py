"""The objective's per-token terms straight from final hidden states, never materialising (b, T, V).

For a model whose logits are a bias-free linear map of the final hidden state, logits = W h:

    residual Q:  Q = W(h_a − h_b)          raw Q:  Q = W h_a
    log π₁      = W h_b − lse(W h_b)
    combined    (Q + α₀ log π₁)/α̃ = W h_c / α̃ − α₀ lse(W h_b)/α̃,
                with h_c = h_a + (α₀ − 1) h_b (residual) or h_a + α₀ h_b (raw)
    V           = α̃ · lse(W h_c / α̃) − α₀ · lse(W h_b)
    log π̃(a)   = w_a·h_c / α̃ − lse(W h_c / α̃)

so a training step needs two vocabulary reductions (one without gradient) and dot products with
the rows w_a of the taken actions: no full-vocabulary log-softmax, no (b, T, V) float32 tensors.
The reductions run in row chunks, and the backward pass recomputes each chunk's logits instead
of storing them. Only torch is imported; :func:`qadapter.objective.token_terms` is the reference.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .objective import QForm, TokenTerms


class _ChunkedLogSumExp(torch.autograd.Function):
    """lse(scale · W h) per row, (N, d) × (V, d) → (N,), holding one (chunk, V) block at a time."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        with _full_precision(hidden.device):  # autocast would run these matmuls in bf16/fp16
            for i in range(0, hidden.shape[0], chunk):
                logits = hidden[i : i + chunk].float() @ weight.float().T  # (c, V)
                out[i : i + chunk] = torch.logsumexp(logits.mul_(scale), dim=-1)
        ctx.save_for_backward(hidden, weight, out)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, out = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        w = weight.float()
        grad_h = torch.empty_like(hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        with _full_precision(hidden.device):
            for i in range(0, hidden.shape[0], chunk):
                h = hidden[i : i + chunk].float()  # (c, d)
                # d lse / d logits = softmax; recompute it rather than keep (N, V) alive since forward
                probs = torch.exp((h @ w.T).mul_(scale).sub_(out[i : i + chunk, None]))  # (c, V)
                probs.mul_((grad_out[i : i + chunk] * scale)[:, None])
                if grad_h is not None:
                    grad_h[i : i + chunk] = probs @ w  # (c, d)
                if grad_w is not None:
                    grad_w += probs.T @ h  # (V, d)
        return (
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            None,
            None,
        )


def base_coefficient(alpha_0: float, adapters: Iterable[tuple[float, str]]) -> float:
    """The weight of the base pass's logits in Σ_i w_i·Q_i + α₀ log π₁, for adapters given as (w_i, Q form):
    with Q_i = a_i − b (residual) or a_i (raw) and log π₁ = b − lse(b),

        Σ_i w_i·Q_i + α₀ log π₁ = Σ_i w_i·a_i + (α₀ − Σ_residual w_i)·b − const(row),

    so where this is exactly 0 (one residual adapter at weight 1 and α₀ = 1) the base pass is not
    needed. Compared exactly on purpose: the pass is skipped only where its terms cancel exactly; a
    rounding difference runs it and multiplies it by a tiny coefficient, which is still exact."""
    return alpha_0 - sum(weight for weight, form in adapters if form == "residual")


def combined_hidden(adapters: Iterable[tuple[torch.Tensor, float, str]], h_base: torch.Tensor | None, alpha_0: float) -> torch.Tensor:
    """The final hidden state h_c whose projection W h_c is α̃ times the customized logits
    (Σ_i w_i·Q_i + α₀ log π₁)/α̃ up to a constant per row (see :func:`base_coefficient`):

        h_c = Σ_i w_i·h_i + (α₀ − Σ_residual w_i)·h_base

    ``adapters``: (h_i, w_i, Q form) per adapter, each h (..., d); ``h_base``: (..., d), or None where the
    base terms cancel. Returns (..., d), not yet divided by α̃."""
    adapters = list(adapters)
    h = sum((weight * h_i for h_i, weight, _ in adapters), torch.zeros_like(adapters[0][0] if adapters else h_base))
    if h_base is not None:
        h = h + base_coefficient(alpha_0, [(weight, form) for _, weight, form in adapters]) * h_base
    return h  # type: ignore[return-value]


def chunked_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, scale: float = 1.0, chunk: int = 256) -> torch.Tensor:
    """log Σ_v exp(scale · w_v·h) for each row of ``hidden``: (N, d), (V, d) → (N,), in float32."""
    return _ChunkedLogSumExp.apply(hidden, weight, scale, chunk)


def token_terms_from_hidden(
    h_adapter: torch.Tensor,
    h_base: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    q_form: QForm,
    alpha_0: float,
    alpha_tilde: float,
    chunk: int = 256,
) -> TokenTerms:
    """:func:`qadapter.objective.token_terms` for logits = W h, from hidden states (b, T, d).

    Vocabulary reductions run only where an action is scored (``completion_mask[:, 1:]``); the
    other positions get 0, which the objective masks anyway.
    """
    if q_form not in ("residual", "raw"):
        raise ValueError(f"q_form must be 'residual' or 'raw', got {q_form!r}")
    action_mask = completion_mask[:, 1:].bool()  # (b, T-1)
    rows = action_mask.nonzero(as_tuple=True)  # the scored (sequence, position) pairs
    h_a = h_adapter[:, :-1][rows].float()  # (N, d)
    h_b = h_base[:, :-1][rows].detach().float()  # (N, d)
    w_a = weight[input_ids[:, 1:][rows]].float()  # (N, d): output rows of the taken actions
    h_c = combined_hidden([(h_a, 1.0, q_form)], h_b, alpha_0)  # (N, d)
    with torch.no_grad():
        lse_b = chunked_logsumexp(h_b, weight, 1.0, chunk)  # (N,)
    lse_c = chunked_logsumexp(h_c, weight, 1.0 / alpha_tilde, chunk)  # (N,)
    q_taken = (w_a * (h_a - h_b if q_form == "residual" else h_a)).sum(-1)  # (N,)
    base_logp = (w_a * h_b).sum(-1) - lse_b
    values = alpha_tilde * lse_c - alpha_0 * lse_b
    policy_logp = (w_a * h_c).sum(-1) / alpha_tilde - lse_c

    def scatter(per_row: torch.Tensor) -> torch.Tensor:  # (N,) → (b, T-1), 0 where not scored
        out = per_row.new_zeros(action_mask.shape)
        return out.index_put(rows, per_row)

    return TokenTerms(
        q_taken=scatter(q_taken),
        values=scatter(values),
        base_logp=scatter(base_logp),
        policy_logp=scatter(policy_logp),
        action_mask=action_mask.float(),
    )


@torch.no_grad()
def taken_logprobs_from_hidden(
    hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """log softmax(W h_t)[a_t] = w_{a_t}·h_t − lse(W h_t) of ONE pass's final hidden states (b, T, d),
    where ``completion_mask[:, 1:]`` scores an action: (b, T-1), 0 elsewhere. The same arithmetic as
    ``base_logp`` of :func:`token_terms_from_hidden`."""
    action_mask = completion_mask[:, 1:].bool()  # (b, T-1)
    rows = action_mask.nonzero(as_tuple=True)
    h = hidden[:, :-1][rows].float()  # (N, d)
    w_a = weight[input_ids[:, 1:][rows]].float()  # (N, d)
    logp = (w_a * h).sum(-1) - chunked_logsumexp(h, weight, 1.0, chunk)  # (N,)
    return logp.new_zeros(action_mask.shape).index_put(rows, logp)


@torch.no_grad()
def kl_from_hidden(
    h_adapter: torch.Tensor,
    h_base: torch.Tensor,
    weight: torch.Tensor,
    *,
    q_form: QForm,
    alpha_0: float,
    alpha_tilde: float,
    chunk: int = 256,
) -> torch.Tensor:
    """:func:`qadapter.objective.kl_from_logits` for logits = W h, row by row: (N, d), (N, d) → (N,).

    log π̃ = W h_c / α̃ − lse(W h_c / α̃) (the α₀ lse(W h_b) term is a per-state constant), log π₁ = log softmax(W h_b).
    """
    h_c = combined_hidden([(h_adapter.float(), 1.0, q_form)], h_base.float(), alpha_0)  # (N, d)
    w = weight.float()
    out = torch.empty(h_c.shape[0], dtype=torch.float32, device=h_c.device)
    with _full_precision(h_c.device):
        for i in range(0, h_c.shape[0], chunk):
            log_policy = torch.log_softmax(h_c[i : i + chunk] @ w.T / alpha_tilde, dim=-1)  # (c, V)
            log_base = torch.log_softmax(h_base[i : i + chunk].float() @ w.T, dim=-1)  # (c, V)
            out[i : i + chunk] = (log_policy.exp() * (log_policy - log_base)).sum(-1)
    return out


def _full_precision(device: torch.device):
    """Turn off an enclosing autocast: these reductions are meant to run in float32."""
    return torch.autocast(device.type, enabled=False)
