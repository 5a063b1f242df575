"""Turning one step's logits into tokens: temperature, nucleus (top-p) and greedy choice.

Pure functions of a logits tensor. ``noise`` lets a test draw the randomness up front, so
sampling is deterministic under test (the Gumbel-max trick: argmax(logits + Gumbel) is a
sample from softmax(logits)).
"""

from __future__ import annotations

import torch


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
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose the next token per row. ``temperature == 0`` is greedy. (b, V) → (b,)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    filtered = top_p_filter(logits.float() / temperature, top_p)  # (b, V)
    if noise is None:
        uniform = torch.rand(filtered.shape, generator=generator, device=filtered.device)
        noise = -torch.log(-torch.log(uniform.clamp_min(1e-20)))  # Gumbel(0, 1)
    return (filtered + noise).argmax(-1)
