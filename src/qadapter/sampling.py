"""Turning one step's logits into tokens: temperature, top-k, nucleus (top-p) and greedy choice.

Pure functions of a logits tensor. ``noise`` lets a test draw the randomness up front, so
sampling is deterministic under test (the Gumbel-max trick: argmax(logits + Gumbel) is a
sample from softmax(logits)).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Sampling(NamedTuple):
    """How one sequence draws its tokens: ``temperature`` 0 is greedy; ``top_k`` 0 keeps every token."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` most likely tokens of each row (ties at the k-th value too); the rest get −inf.
    ``top_k`` 0 keeps all. (b, V) → (b, V)."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if top_k == 0 or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (b, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches ``top_p`` (Holtzman et
    al., 2020); the rest get −inf. The most likely token is always kept. (b, V) → (b, V)."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p == 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (b, V)
    cum = sorted_logits.softmax(-1).cumsum(-1)  # (b, V)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already enough
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # (b, V), back in vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose the next token per row. ``temperature == 0`` is greedy; otherwise temperature, then top-k,
    then top-p (vLLM's order). (b, V) → (b,)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    filtered = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)  # (b, V)
    if noise is None:
        uniform = torch.rand(filtered.shape, generator=generator, device=filtered.device)
        noise = -torch.log(-torch.log(uniform.clamp_min(1e-20)))  # Gumbel(0, 1)
    return (filtered + noise).argmax(-1)
