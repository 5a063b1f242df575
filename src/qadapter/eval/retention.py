"""Knowledge retention: the same benchmark items, with the same prompts, under the base and the
customized policies — several (α₀, α̃) settings from ONE pair of forward passes per batch, since the
dial only changes how the two passes are combined.

Paired comparisons: every policy answers the same items, so differences to the base come with a
paired confidence interval over items, which resolves far smaller changes than two separate
accuracies would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..collate import pad_rows
from ..config import DecodeConfig
from ..hardware import EVAL_PRECISION, MixedPrecision, autocast
from .benchmarks import ChoiceItem, GenerationItem, final_number


@dataclass(frozen=True)
class PolicySpec:
    """A policy to evaluate: the base (``base=True``) or the customized one at (α₀, α̃)."""

    name: str
    alpha_0: float | None = None
    alpha_tilde: float | None = None
    base: bool = False


def _encode(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # Context and continuation are tokenized apart so every policy scores the same continuation ids;
    # no special tokens are added (lm-evaluation-harness's default, and chat-rendered text has its own).
    return tokenizer(context, add_special_tokens=False)["input_ids"], tokenizer(continuation, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def choice_logliks(
    qmodel: Any,
    items: Sequence[ChoiceItem],
    policies: Sequence[PolicySpec],
    *,
    batch_size: int = 16,
    max_length: int = 1024,
    precision: MixedPrecision = EVAL_PRECISION,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, list[list[float]]]:
    """log P(choice | context) per policy, item and choice, summed over the choice's tokens.

    Over-long contexts lose tokens from the left (the continuation is always scored whole).
    ``on_batch(n)`` reports progress in scored sequences (one per item and choice).
    """
    rows: list[tuple[list[int], list[int]]] = []
    owner: list[int] = []  # item index of each row
    for i, item in enumerate(items):
        for choice in item.choices:
            context, cont = _encode(qmodel.tokenizer, item.context, choice)
            rows.append((context[max(0, len(context) + len(cont) - max_length) :], cont))
            owner.append(i)
    scores: dict[str, list[float]] = {p.name: [] for p in policies}
    device = qmodel.device
    was_training = qmodel.training
    qmodel.set_training(False)
    for start in range(0, len(rows), batch_size):
        ids, attention, completion = (t.to(device) for t in pad_rows(rows[start : start + batch_size], qmodel.tokenizer.pad_token_id))
        with autocast(device, precision):
            passes = qmodel.passes(ids, attention)
            for policy in policies:
                terms = passes.terms(completion, policy.alpha_0, policy.alpha_tilde)
                logp = terms.base_logp if policy.base else terms.policy_logp
                scores[policy.name].extend((logp * terms.action_mask).sum(-1).float().cpu().tolist())
        if on_batch is not None:
            on_batch(len(rows[start : start + batch_size]))
    qmodel.set_training(was_training)
    out: dict[str, list[list[float]]] = {}
    for name, flat in scores.items():
        per_item: list[list[float]] = [[] for _ in items]
        for i, value in zip(owner, flat):
            per_item[i].append(value)
        out[name] = per_item
    return out


def choice_accuracy(items: Sequence[ChoiceItem], logliks: Sequence[Sequence[float]]) -> tuple[list[int], list[int]]:
    """Per-item correctness (1/0): ``acc`` picks the highest log-likelihood, ``acc_norm`` the highest
    log-likelihood per character of the choice (lm-evaluation-harness's two conventions)."""
    acc, acc_norm = [], []
    for item, scores in zip(items, logliks):
        per_char = [s / max(1, len(c)) for s, c in zip(scores, item.choices)]
        acc.append(int(max(range(len(scores)), key=scores.__getitem__) == item.gold))
        acc_norm.append(int(max(range(len(per_char)), key=per_char.__getitem__) == item.gold))
    return acc, acc_norm


def generation_correct(
    qmodel: Any, items: Sequence[GenerationItem], policy: PolicySpec, *, max_new_tokens: int = 192, batch_size: int = 8, precision: MixedPrecision = EVAL_PRECISION
) -> list[int]:
    """Per-item exact match of the final number of a greedy answer (GSM8K convention), 1/0."""
    from ..decode import generate

    config = DecodeConfig(max_new_tokens=max_new_tokens, alpha_0=policy.alpha_0, alpha_tilde=policy.alpha_tilde)
    correct = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        answers = generate(qmodel, [item.prompt for item in chunk], config, policy="base" if policy.base else "customized", chat=False, precision=precision)
        for item, text in zip(chunk, answers):
            answer = text.split("Question:")[0].split("\n\n")[0]  # the harness stops at these
            correct.append(int(final_number(answer) == final_number(item.answer)))
    return correct


@torch.no_grad()
def kl_to_base(
    qmodel: Any, texts: Sequence[tuple[str, str]], policies: Sequence[PolicySpec], *, batch_size: int = 8, precision: MixedPrecision = EVAL_PRECISION
) -> dict[str, float]:
    """Mean per-token KL(π̃ ‖ π₁) over the response tokens of (prompt, response) texts, per policy."""
    rows = [_encode(qmodel.tokenizer, prompt, response) for prompt, response in texts]
    sums = {p.name: 0.0 for p in policies}
    count = 0
    device = qmodel.device
    was_training = qmodel.training
    qmodel.set_training(False)
    for start in range(0, len(rows), batch_size):
        ids, attention, completion = (t.to(device) for t in pad_rows(rows[start : start + batch_size], qmodel.tokenizer.pad_token_id))
        states = torch.zeros_like(completion, dtype=torch.bool)
        states[:, :-1] = completion[:, 1:].bool()  # the states from which response tokens are drawn
        with autocast(device, precision):
            passes = qmodel.passes(ids, attention)
            for policy in policies:
                if not policy.base:
                    sums[policy.name] += passes.kl_to_base(states, policy.alpha_0, policy.alpha_tilde).sum().item()
        count += int(states.sum())
    qmodel.set_training(was_training)
    return {name: (total / max(count, 1)) for name, total in sums.items()}


@dataclass
class PairedDifference:
    """Accuracy of a method minus the base's on the same items, with a 95% interval."""

    mean: float
    low: float
    high: float
    changed: float  # fraction of items whose correctness changed
    n: int


def paired_difference(method: Sequence[int], base: Sequence[int]) -> PairedDifference:
    """Mean of per-item differences d = method − base with a normal 95% interval (sd(d)/√n).

    >>> paired_difference([1, 1, 0, 1], [1, 0, 0, 1]).mean
    0.25
    """
    if len(method) != len(base) or not method:
        raise ValueError("paired_difference needs two equally long, non-empty lists")
    d = [m - b for m, b in zip(method, base)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = 1.96 * math.sqrt(var / n)
    return PairedDifference(mean, mean - half, mean + half, sum(x != 0 for x in d) / n, n)


def wilson_interval(successes: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible also near 0 and 1); a fractional count
    (ties as 1/2) is allowed."""
    if n == 0:
        return (0.0, 1.0)
    p, z = successes / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))  # rounding must not exclude p itself
