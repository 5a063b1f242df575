"""Knowledge retention: the same benchmark items, with the same prompts, under the base and the
customized policies — several (α₀, α̃) settings from ONE pair of forward passes per batch, since the
dial only changes how the two passes are combined.

Paired comparisons: every policy answers the same items, so differences to the base come with a
paired confidence interval over items, which resolves far smaller changes than two separate
accuracies would, an exact McNemar test and the sample's minimum detectable effect.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, TypedDict

import torch

from ..collate import pad_rows, pad_shared
from ..config import DecodeConfig, Dial
from ..hardware import EVAL_PRECISION, MixedPrecision, autocast
from .benchmarks import ChoiceItem, ContextChoiceItem, GenerationItem, final_number


@dataclass(frozen=True)
class PolicySpec:
    """A policy to evaluate: the base (``base=True``) or the customized one at (α₀, α̃)."""

    name: str
    alpha_0: float | None = None
    alpha_tilde: float | None = None
    base: bool = False

    @property
    def dial(self) -> Dial:
        """The customized policy's dial (blanks: the adapter's own); a base policy reads none."""
        return Dial(self.alpha_0, self.alpha_tilde)


def _encode(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # Context and continuation are tokenized apart so every policy scores the same continuation ids;
    # no special tokens are added (lm-evaluation-harness's default, and chat-rendered text has its own).
    return tokenizer(context, add_special_tokens=False)["input_ids"], tokenizer(continuation, add_special_tokens=False)["input_ids"]


def _group(tokenizer: Any, context: str, continuations: Sequence[str], max_length: int) -> tuple[list[int], list[list[int]]]:
    """A context's ids and its continuations' ids, tokenized apart (as :func:`_encode`). An over-long
    context loses tokens from the left, the longest continuation fitting whole, but keeps at least one
    (the state the first continuation token is scored from)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    conts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    keep = max(1, max_length - max(map(len, conts)))
    return ctx[max(0, len(ctx) - keep) :], conts


def _option_groups(tokenizer: Any, item: ChoiceItem | ContextChoiceItem, max_length: int) -> list[tuple[list[int], list[list[int]]]]:
    """The (context, [continuations]) groups that score ``item``'s options, in option order: one
    context shared by its choices, or one group per context with the fixed continuation."""
    if isinstance(item, ContextChoiceItem):
        return [_group(tokenizer, context, [item.continuation], max_length) for context in item.contexts]
    return [_group(tokenizer, item.context, item.choices, max_length)]


def _option_lengths(item: ChoiceItem | ContextChoiceItem) -> list[int]:
    """Characters of the scored text of each option (what ``acc_norm`` divides by)."""
    if isinstance(item, ContextChoiceItem):
        return [len(item.continuation)] * len(item.contexts)
    return [len(c) for c in item.choices]


def _is_adapted_model(qmodel: Any, policy: PolicySpec) -> bool:
    """Whether ``policy`` is the adapted model itself: a residual Q read at α₀ = α̃ = 1, the values as
    configured compared exactly (no arithmetic on them, so no rounding can make 1 out of 0.999…)."""
    alpha_0, alpha_tilde = qmodel.scales(policy.dial)
    return not policy.base and qmodel.config.q_form == "residual" and alpha_0 == 1 and alpha_tilde == 1


@torch.no_grad()
def _response_logliks(
    qmodel: Any,
    groups: Sequence[tuple[list[int], list[list[int]]]],
    policies: Sequence[PolicySpec],
    *,
    batch_size: int,
    precision: MixedPrecision,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Σ_t log π(y_t | x, y_<t) of each continuation y of each (context x, [y, …]) group, in order, per
    policy. Each context is run once per pass, its KV cache shared by its continuations
    (:class:`~qadapter.collate.SharedContexts`); a batch holds whole groups, about ``batch_size``
    continuations. As few passes run as the policies need: the base's alone when every policy is
    the base, the adapter's alone when every policy is the adapted model (:func:`_is_adapted_model`),
    else both. ``on_batch(n)`` reports progress in continuations."""
    single: bool | None = None  # the one pass that serves every policy (True: the adapter's), if there is one
    if all(_is_adapted_model(qmodel, p) for p in policies):
        single = True
    elif all(p.base for p in policies):
        single = False
    scores: dict[str, list[float]] = {p.name: [] for p in policies}
    device = qmodel.device
    was_training = qmodel.training
    qmodel.set_training(False)
    start = 0
    while start < len(groups):
        end, rows = start, 0
        while end < len(groups) and (end == start or rows + len(groups[end][1]) <= batch_size):
            rows += len(groups[end][1])
            end += 1
        shared = pad_shared(groups[start:end], qmodel.tokenizer.pad_token_id).to(device)
        with autocast(device, precision):
            if single is not None:
                logp = qmodel.token_logprobs(shared, adapter=single).sum(-1).cpu().tolist()
                for policy in policies:
                    scores[policy.name].extend(logp)
            else:
                outputs = qmodel.run_shared_passes(shared)
                for policy in policies:
                    terms = outputs.terms(shared.completion_mask, policy.dial)
                    logp = terms.base_logp if policy.base else terms.policy_logp
                    scores[policy.name].extend((logp * terms.action_mask).sum(-1).float().cpu().tolist())
        if on_batch is not None:
            on_batch(rows)
        start = end
    qmodel.set_training(was_training)
    return scores


def choice_logliks(
    qmodel: Any,
    items: Sequence[ChoiceItem | ContextChoiceItem],
    policies: Sequence[PolicySpec],
    *,
    batch_size: int = 16,
    max_length: int = 1024,
    precision: MixedPrecision = EVAL_PRECISION,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, list[list[float]]]:
    """log P(choice | context) per policy, item and choice, summed over the choice's tokens.

    The item's context is run once per pass and shared by its choices (a KV-cache prefix); an
    over-long context loses the same tokens from the left for every choice (each scored whole). Only the passes the
    policies need are run (the adapter's alone for SFT/DPO peers and other residual adapters read at
    α₀ = α̃ = 1). ``batch_size`` counts choices (whole items per batch); ``on_batch(n)`` reports
    progress in scored choices. A :class:`~qadapter.eval.benchmarks.ContextChoiceItem` scores the
    fixed continuation after each of its contexts instead (lm-evaluation-harness's partial scoring
    for Winogrande).
    """
    groups = [group for item in items for group in _option_groups(qmodel.tokenizer, item, max_length)]
    scores = _response_logliks(qmodel, groups, policies, batch_size=batch_size, precision=precision, on_batch=on_batch)
    out: dict[str, list[list[float]]] = {}
    for name, flat in scores.items():
        values = iter(flat)
        out[name] = [[next(values) for _ in _option_lengths(item)] for item in items]
    return out


def _argmax(scores: Sequence[float], rng: random.Random) -> int:
    best = max(scores)
    return rng.choice([k for k, score in enumerate(scores) if score == best])


def choice_picks(items: Sequence[ChoiceItem | ContextChoiceItem], logliks: Sequence[Sequence[float]]) -> tuple[list[int], list[int]]:
    """The option each item's scores pick: ``acc``'s, the highest log-likelihood, and ``acc_norm``'s,
    the highest log-likelihood per character of the choice (lm-evaluation-harness's two conventions).

    Exact ties are broken uniformly at random by ``random.Random(item.id)``: the same scores give the
    same pick for every policy and every run, and no option (say, a gold listed first) wins ties.
    """
    picks, picks_norm = [], []
    for item, scores in zip(items, logliks):
        per_char = [s / max(1, n) for s, n in zip(scores, _option_lengths(item))]
        picks.append(_argmax(scores, random.Random(item.id)))
        picks_norm.append(_argmax(per_char, random.Random(item.id)))
    return picks, picks_norm


def choice_accuracy(items: Sequence[ChoiceItem | ContextChoiceItem], logliks: Sequence[Sequence[float]]) -> tuple[list[int], list[int]]:
    """Per-item correctness (1/0) under ``acc`` and ``acc_norm``: whether :func:`choice_picks` picks gold."""
    picks, picks_norm = choice_picks(items, logliks)
    return [int(p == item.gold) for p, item in zip(picks, items)], [int(p == item.gold) for p, item in zip(picks_norm, items)]


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
            outputs = qmodel.run_passes(ids, attention)
            for policy in policies:
                if not policy.base:
                    sums[policy.name] += outputs.kl(states, policy.dial).sum().item()
        count += int(states.sum())
    qmodel.set_training(was_training)
    return {name: (total / max(count, 1)) for name, total in sums.items()}


class BitsPerByte(TypedDict):
    """One policy's bits per byte on a list of texts (JSON-able, as the runner's cache stores it)."""

    mean: float  # mean over texts of per_text, so two policies' means differ by their mean paired difference
    pooled: float  # Σ bits / Σ bytes over all texts (lm-evaluation-harness's corpus-level convention)
    per_text: list[float]


def bits_per_byte(
    qmodel: Any,
    texts: Sequence[tuple[str, str]],
    policies: Sequence[PolicySpec],
    *,
    precision: MixedPrecision = EVAL_PRECISION,
    batch_size: int = 8,
    max_length: int = 1024,
) -> dict[str, BitsPerByte]:
    """Bits per byte of each (prompt, response) text's response under each policy:

        bpb(y | x) = −Σ_t log₂ π(y_t | x, y_<t) / bytes(y) = −Σ_t ln π(y_t | x, y_<t) / (ln 2 · len(y.encode("utf-8")))

    over the response's tokens (tokenized apart from the prompt, as :func:`choice_logliks` does; an
    over-long prompt loses tokens from the left). The same forward passes serve every policy. Paired
    differences to the base: :func:`mean_difference` of the ``per_text`` lists.
    """
    groups = [_group(qmodel.tokenizer, prompt, [response], max_length) for prompt, response in texts]
    if not groups or not all(cont for _, (cont,) in groups):
        raise ValueError("bits_per_byte needs texts, each with a response of at least one token")
    sizes = [len(response.encode("utf-8")) for _, response in texts]
    scores = _response_logliks(qmodel, groups, policies, batch_size=batch_size, precision=precision)
    out: dict[str, BitsPerByte] = {}
    for name, logliks in scores.items():
        per_text = [-ll / (math.log(2) * size) for ll, size in zip(logliks, sizes)]
        out[name] = BitsPerByte(mean=sum(per_text) / len(per_text), pooled=-sum(logliks) / (math.log(2) * sum(sizes)), per_text=per_text)
    return out


@contextlib.contextmanager
def scaled_adapter(qmodel: Any, lam: float) -> Iterator[Any]:
    """Inside the block the LoRA delta is scaled by λ ∈ [0, 1] (WiSE-FT-style weight interpolation):
    every LoRA layer computes W x + λ·(lora_alpha/r)·B A x, i.e. the weights W + λ·ΔW — the base at
    λ = 0, the adapter at λ = 1. Uses PEFT's own ``peft.helpers.rescale_adapter_scale`` (every LoRA
    adapter on the model is scaled, a composition's companions too); the scales are restored on exit.

    A cache keyed by :func:`~qadapter.eval.runner.adapter_digest` does not see λ: key stages by it too.
    """
    from peft.helpers import rescale_adapter_scale

    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"scaled_adapter: λ must be in [0, 1], got {lam!r}")
    with rescale_adapter_scale(qmodel.peft_model, float(lam)):
        yield qmodel


@dataclass
class MeanDifference:
    """Mean of paired differences with a normal 95% interval."""

    mean: float
    low: float
    high: float
    n: int


def mean_difference(method: Sequence[float], base: Sequence[float]) -> MeanDifference:
    """Mean of per-item differences d = method − base with the interval mean ± 1.96·sd(d)/√n.

    >>> mean_difference([1.5, 2.0], [1.0, 1.5]).mean
    0.5
    """
    if len(method) != len(base) or not method:
        raise ValueError("a paired difference needs two equally long, non-empty lists")
    d = [m - b for m, b in zip(method, base)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = 1.96 * math.sqrt(var / n)
    return MeanDifference(mean, mean - half, mean + half, n)


@dataclass
class PairedDifference:
    """Accuracy of a method minus the base's on the same items, with a 95% interval."""

    mean: float
    low: float
    high: float
    changed: float  # share of items whose answer (the picked option) differs from the base's
    n: int
    mcnemar_p: float  # two-sided exact McNemar p-value of "no difference in accuracy"
    mde: float  # minimum detectable |difference in accuracy| (α = 0.05, power 0.8), see minimum_detectable_effect


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: ``b`` items right only under the
    method, ``c`` right only under the base. Under "no difference" b ~ Binomial(b + c, ½), so

        p = min(1, 2 · Σ_{i=0}^{min(b, c)} C(b + c, i) / 2^(b + c))   (p = 1 without discordant pairs),

    computed in exact integer arithmetic (one rounding, in the final division).

    >>> mcnemar_exact(8, 2)
    0.109375
    """
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def minimum_detectable_effect(discordant: int, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest |difference in accuracy| a two-sided paired test at level ``alpha`` detects with
    probability ``power`` on ``n`` items of which ``discordant`` changed correctness:

        MDE = (z_{1−α/2} + z_{power}) · √(p_disc / n),   p_disc = max(discordant / n, 1 / n)

    (the per-item difference d ∈ {−1, 0, 1} has variance ≈ p_disc near no effect; flooring p_disc at
    1/n keeps the MDE above 0 when no item changed). At the defaults z_{0.975} + z_{0.8} ≈ 2.8016.
    """
    if n <= 0:
        raise ValueError("minimum_detectable_effect needs n > 0")
    z = NormalDist().inv_cdf
    p_disc = max(discordant / n, 1 / n)
    return (z(1 - alpha / 2) + z(power)) * math.sqrt(p_disc / n)


def paired_difference(
    method: Sequence[int], base: Sequence[int], *, method_picks: Sequence[Any] | None = None, base_picks: Sequence[Any] | None = None
) -> PairedDifference:
    """Paired comparison of per-item correctness (1/0) of a method and the base on the same items: the
    mean difference with its 95% interval (:func:`mean_difference`), the exact McNemar p-value
    (:func:`mcnemar_exact`) and the minimum detectable effect (:func:`minimum_detectable_effect`).

    ``changed`` is the share of items whose picked answer (``method_picks`` vs ``base_picks``, e.g.
    option indices from :func:`choice_picks`) differs; without picks, the share whose correctness
    differs — a lower bound wherever an item has more than two possible answers.

    >>> paired_difference([1, 1, 0, 1], [1, 0, 0, 1]).mean
    0.25
    """
    diff = mean_difference(method, base)
    if any(x not in (0, 1) for x in (*method, *base)):
        raise ValueError("paired_difference compares 1/0 correctness")
    if (method_picks is None) != (base_picks is None):
        raise ValueError("paired_difference needs the picks of both or of neither")
    b = sum(m > x for m, x in zip(method, base))  # right only under the method
    c = sum(m < x for m, x in zip(method, base))  # right only under the base
    if method_picks is not None and base_picks is not None:
        if len(method_picks) != diff.n or len(base_picks) != diff.n:
            raise ValueError("paired_difference needs one pick per item")
        changed = sum(m != x for m, x in zip(method_picks, base_picks)) / diff.n
    else:
        changed = (b + c) / diff.n
    return PairedDifference(diff.mean, diff.low, diff.high, changed, diff.n, mcnemar_exact(b, c), minimum_detectable_effect(b + c, diff.n))


def wilson_interval(successes: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible also near 0 and 1); a fractional count
    (ties as 1/2) is allowed."""
    if n == 0:
        return (0.0, 1.0)
    p, z = successes / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))  # rounding must not exclude p itself
