"""Held-out preference accuracy of the implicit reward R = Σ r₂ (arXiv 2407.03856 Eq. 9): what training
reports while it runs, and what evaluation compares across methods and dial settings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import objective
from .config import Dial
from .collate import TokenizedPair, collate_pairs, prompt_grouped_batches, tokenize_pair
from .data import PreferenceRecord, Turns
from .errors import DataError
from .hardware import EVAL_PRECISION, MixedPrecision, autocast


@dataclass
class PreferenceEval:
    """Held-out preference results of one policy, summed over the pairs."""

    accuracy: float  # chosen ranked above rejected; ties (|margin| <= 1e-3 nats) count 1/2
    n_pairs: int
    ties: int
    margin_mean: float  # mean R(chosen) − R(rejected)
    loss: float  # mean Bradley–Terry + β·penalty
    chosen_reward_mean: float
    rejected_reward_mean: float
    margins: list[float] | None = None  # per pair, in the order given (only when asked: keep_pairs=True)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, tie_tolerance: float = 1e-3) -> torch.Tensor:
    """1 where the chosen response gets the higher reward, 0 where lower, 0.5 on a tie (the
    expected score of breaking it at random), per pair: (B,) → (B,).

    Margins within ``tie_tolerance`` nats are ties: a fresh residual adapter has margin 0, which
    float32 sums over a few hundred tokens turn into noise of about 1e-5; learned margins are O(1).
    """
    diff = chosen_rewards - rejected_rewards
    tie = diff.abs() <= tie_tolerance
    return (diff > 0).to(diff.dtype) * ~tie + 0.5 * tie.to(diff.dtype)


@torch.no_grad()
def evaluate_preferences(
    qmodel: Any,
    pairs: list[TokenizedPair],
    *,
    batch_size: int = 8,
    precision: MixedPrecision = EVAL_PRECISION,
    on_batch: Callable[[int], None] | None = None,
) -> PreferenceEval:
    """Score every pair with the current adapter at its own (α₀, α̃); ``on_batch(n_pairs)`` reports progress."""
    return evaluate_preferences_at(qmodel, pairs, [Dial()], batch_size=batch_size, precision=precision, on_batch=on_batch)[0]


@torch.no_grad()
def evaluate_preferences_at(
    qmodel: Any,
    pairs: list[TokenizedPair],
    dials: list[Dial],
    *,
    batch_size: int = 8,
    precision: MixedPrecision = EVAL_PRECISION,
    keep_pairs: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[PreferenceEval]:
    """One :class:`PreferenceEval` per dial in ``dials`` (its blanks: the adapter's own), all from one
    pair of forward passes per batch; ``keep_pairs`` adds each pair's margin, in the order of ``pairs``."""
    was_training = qmodel.training
    qmodel.set_training(False)
    results: list[list[objective.PairObjective]] = [[] for _ in dials]
    order: list[int] = []
    try:
        for index in prompt_grouped_batches(pairs, batch_size):
            order += index
            batch = collate_pairs([pairs[i] for i in index], qmodel.tokenizer.pad_token_id).to(qmodel.device)
            with autocast(qmodel.device, precision):
                outputs = qmodel.pair_passes(batch)  # each prompt once
                for out, dial in zip(results, dials):
                    out.append(qmodel.pair_objective(outputs.terms(dial=dial), batch))
            if on_batch is not None:
                on_batch(len(index))
    finally:
        qmodel.set_training(was_training)
    summaries = [summarize(r) for r in results]
    if keep_pairs:
        position = torch.tensor(order).argsort()  # batches are grouped by prompt; margins go back to input order
        for summary, r in zip(summaries, results):
            margins = torch.cat([(o.chosen_rewards - o.rejected_rewards).detach().float().cpu() for o in r])
            summary.margins = margins[position].tolist()
    return summaries


def summarize(results: list[objective.PairObjective]) -> PreferenceEval:
    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(r, name).detach().float().cpu() for r in results])

    chosen, rejected = cat("chosen_rewards"), cat("rejected_rewards")
    accuracy = preference_accuracy(chosen, rejected)
    return PreferenceEval(
        accuracy=accuracy.mean().item(),
        n_pairs=chosen.numel(),
        ties=int((accuracy == 0.5).sum().item()),
        margin_mean=(chosen - rejected).mean().item(),
        loss=cat("loss").mean().item(),
        chosen_reward_mean=chosen.mean().item(),
        rejected_reward_mean=rejected.mean().item(),
    )


@dataclass(frozen=True)
class PairResult:
    """One pair's result under one policy, with what a user slices by: the record's prompt, origin and category."""

    index: int  # the record's position in the records given
    prompt: Turns
    origin: str  # "file:line" where the record came from
    category: str | None
    margin: float  # R(chosen) − R(rejected), nats
    score: float  # 1 chosen ranked above rejected, 0 below, 0.5 a tie (as :func:`preference_accuracy`)


def preference_pairs(
    qmodel: Any,
    records: Sequence[PreferenceRecord],
    dial: Dial = Dial(),
    *,
    categories: Sequence[str | None] | None = None,
    batch_size: int = 8,
    precision: MixedPrecision = EVAL_PRECISION,
) -> list[PairResult]:
    """Per-pair preference results of the customized policy at ``dial`` (blanks: the adapter's own), one
    per record that fits the adapter's ``max_length``/``max_prompt_length`` (the others are left out, as
    in training), in record order. ``categories``: a label per record, carried into its result, so
    that :func:`by_category` (or any grouping) can slice the results.

    Example::

        pairs = preference_pairs(qmodel, records, categories=[r["topic"] for r in rows])
        by_category(pairs)  # {"code": {"accuracy": 0.81, "n_pairs": 52, "margin_mean": 1.3}, ...}
    """
    if categories is not None and len(categories) != len(records):
        raise DataError(f"categories has {len(categories)} labels for {len(records)} records")
    extra_eos = getattr(qmodel.peft_model.generation_config, "eos_token_id", None)
    kept: list[int] = []
    pairs: list[TokenizedPair] = []
    for i, record in enumerate(records):
        try:
            pairs.append(tokenize_pair(record, qmodel.tokenizer, qmodel.config.max_length, qmodel.config.max_prompt_length, extra_eos))
        except DataError:  # too long to score after truncation
            continue
        kept.append(i)
    if not pairs:
        return []
    (result,) = evaluate_preferences_at(qmodel, pairs, [dial], batch_size=batch_size, precision=precision, keep_pairs=True)
    margins = torch.tensor(result.margins)  # (n,)
    scores = preference_accuracy(margins, torch.zeros_like(margins)).tolist()
    return [
        PairResult(i, records[i].prompt, records[i].origin, None if categories is None else categories[i], margin, score)
        for i, margin, score in zip(kept, result.margins, scores)  # type: ignore[arg-type]
    ]


def by_category(results: Sequence[PairResult]) -> dict[str | None, dict[str, float]]:
    """Accuracy, number of pairs and mean margin per category of :func:`preference_pairs`' results."""
    groups: dict[str | None, list[PairResult]] = {}
    for r in results:
        groups.setdefault(r.category, []).append(r)
    return {
        category: {
            "accuracy": sum(r.score for r in members) / len(members),
            "n_pairs": len(members),
            "margin_mean": sum(r.margin for r in members) / len(members),
        }
        for category, members in groups.items()
    }
