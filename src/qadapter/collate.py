"""PreferenceRecords → token ids → padded batches.

A batch holds each *distinct* sequence (prompt + response) once and says which rows form each
pair: ``chosen_index[i]`` and ``rejected_index[i]`` are rows of ``input_ids``. When pairs share
a response (DSP pairs one chosen response with four rejected ones) it is scored once.
``completion_mask`` is 1 exactly on response tokens: never on the prompt, padding, or anything
after the first EOS.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import torch

from .data import PreferenceRecord
from .errors import DataError


@dataclass(frozen=True)
class TokenizedPair:
    """One pair as token ids; chosen and rejected share the very same prompt ids."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    origin: str = ""


@dataclass
class PreferenceBatch:
    """Padded distinct sequences plus the pair structure over them.

    input_ids, attention_mask, completion_mask: (n, T) with n <= 2B distinct sequences.
    chosen_index, rejected_index: (B,) rows of the pairs' chosen and rejected sequences.
    shared: the same n sequences, in the same order, as continuations of their distinct prompts
    (:class:`SharedContexts`), so that a prompt that several sequences share runs once.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    shared: "SharedContexts | None" = None

    @property
    def num_pairs(self) -> int:
        return self.chosen_index.shape[0]

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        return PreferenceBatch(**{k: v.to(device) if v is not None else None for k, v in vars(self).items()})


def eos_ids(tokenizer: Any, extra: int | list[int] | None = None) -> set[int]:
    """Token ids that end a response: the tokenizer's EOS plus any the model's generation config adds."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return ids


def render(record: PreferenceRecord, tokenizer: Any) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as text, via the chat template for conversations.

    The response text is what the template appends to the prompt rendered with
    ``add_generation_prompt=True``, so the model scores exactly what it would generate.
    """
    if not record.conversational:
        return record.prompt, record.chosen, record.rejected  # type: ignore[return-value]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{record.origin}: conversational record, but the tokenizer has no chat template")
    from jinja2 import TemplateError

    try:
        prompt = tokenizer.apply_chat_template(record.prompt, tokenize=False, add_generation_prompt=True)
        fulls = [
            tokenizer.apply_chat_template(list(record.prompt) + list(turns), tokenize=False)
            for turns in (record.chosen, record.rejected)
        ]
    except TemplateError as exc:  # templates raise_exception() on turn orders or roles they do not support
        raise DataError(f"{record.origin}: the chat template refuses this conversation ({exc})") from None
    responses = []
    for name, full in zip(("chosen", "rejected"), fulls):
        if not full.startswith(prompt):
            raise DataError(f"{record.origin}: the chat template does not render the {name} conversation as prompt + response")
        responses.append(full[len(prompt) :])
    return prompt, responses[0], responses[1]


def _response_ids(text: str, tokenizer: Any, eos: set[int], conversational: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for i, tok in enumerate(ids):
        if tok in eos:
            return ids[: i + 1]  # nothing after the first EOS is an action of the response
    # Plain text carries no end marker: add EOS, as the model must learn where to stop.
    return ids + [tokenizer.eos_token_id] if not conversational and tokenizer.eos_token_id is not None else ids


def truncate(prompt: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int) -> tuple[list[int], list[list[int]]]:
    """Fit prompt + each response into ``max_length`` tokens, keeping the responses.

    The prompt loses tokens from the left first, but keeps at least ``max_prompt_length`` of them;
    then responses lose tokens from the right. All responses keep the same prompt, so paired
    sequences start from the same state.
    """
    longest = max(len(r) for r in responses)
    overflow = len(prompt) + longest - max_length
    if overflow > 0:
        keep = max(min(len(prompt), max_prompt_length), len(prompt) - overflow)
        keep = min(keep, max_length - 1)  # leave room for at least one response token
        prompt = prompt[len(prompt) - keep :]
    budget = max_length - len(prompt)
    return prompt, [r[:budget] for r in responses]


def tokenize_pair(
    record: PreferenceRecord,
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
    extra_eos: int | list[int] | None = None,
) -> TokenizedPair:
    """Tokenize one record. Prompt and responses are tokenized separately so both responses
    continue the identical prompt ids."""
    prompt_text, chosen_text, rejected_text = render(record, tokenizer)
    eos = eos_ids(tokenizer, extra_eos)
    # A chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS).
    prompt = tokenizer(prompt_text, add_special_tokens=not record.conversational)["input_ids"]
    responses = [_response_ids(t, tokenizer, eos, record.conversational) for t in (chosen_text, rejected_text)]
    if not prompt:
        raise DataError(f"{record.origin}: the prompt is empty after tokenization")
    prompt, (chosen, rejected) = truncate(prompt, responses, max_length, max_prompt_length)
    for name, ids in (("chosen", chosen), ("rejected", rejected)):
        if not ids:
            raise DataError(f"{record.origin}: the {name} response is empty after tokenization")
    if chosen == rejected:
        raise DataError(f"{record.origin}: chosen and rejected are identical after truncation to {max_length} tokens")
    return TokenizedPair(tuple(prompt), tuple(chosen), tuple(rejected), record.origin)


def tokenize_records(
    records: list[PreferenceRecord], tokenizer: Any, max_length: int, max_prompt_length: int, extra_eos: Any = None
) -> tuple[list[TokenizedPair], list[str]]:
    """Tokenize all records; pairs that cannot be scored after truncation are skipped and reported."""
    pairs, skipped = [], []
    for record in records:
        try:
            pairs.append(tokenize_pair(record, tokenizer, max_length, max_prompt_length, extra_eos))
        except DataError as exc:
            skipped.append(str(exc))
    return pairs, skipped


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int, padding_side: str = "right") -> PreferenceBatch:
    """Pad the distinct sequences of ``pairs`` into one batch (see :class:`PreferenceBatch`).

    Example, one pair, prompt (5, 6), chosen (7, 2), rejected (8, 9, 2), pad 0, right padding::

        input_ids       = [[5, 6, 7, 2, 0], [5, 6, 8, 9, 2]]
        attention_mask  = [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
        completion_mask = [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
        chosen_index = [0], rejected_index = [1]
    """
    rows: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    chosen_index, rejected_index = [], []
    for pair in pairs:
        for response, index in ((pair.chosen, chosen_index), (pair.rejected, rejected_index)):
            index.append(rows.setdefault((pair.prompt, response), len(rows)))
    ids, attention, completion = pad_rows(list(rows), pad_token_id, padding_side)
    shared = shared_rows(list(rows), pad_token_id)
    return PreferenceBatch(ids, attention, completion, torch.tensor(chosen_index), torch.tensor(rejected_index), shared)


def shared_rows(rows: list[tuple[Sequence[int], Sequence[int]]], pad_token_id: int) -> "SharedContexts":
    """(prompt, response) rows → :class:`SharedContexts` with one context per distinct prompt (in order of first
    appearance) and one continuation per row, in the rows' order. Every prompt must be non-empty."""
    prompts = list(dict.fromkeys(tuple(prompt) for prompt, _ in rows))
    where = {prompt: i for i, prompt in enumerate(prompts)}
    context_ids, context_mask, _ = pad_rows([(prompt, ()) for prompt in prompts], pad_token_id, "left")
    ids, mask, _ = pad_rows([((), response) for _, response in rows], pad_token_id)
    owner = torch.tensor([where[tuple(prompt)] for prompt, _ in rows])
    return SharedContexts(context_ids, context_mask, ids, mask, owner)


def pad_rows(
    rows: list[tuple[Sequence[int], Sequence[int]]], pad_token_id: int, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt, response) id rows → padded (input_ids, attention_mask, completion_mask), each (n, T)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        start = 0 if padding_side == "right" else width - n
        ids[row, start : start + n] = torch.tensor(list(prompt) + list(response))
        attention[row, start : start + n] = 1
        completion[row, start + len(prompt) : start + n] = 1
    return ids, attention, completion


@dataclass
class SharedContexts:
    """Continuations of shared contexts, for scoring each context once (its KV cache reused by every
    continuation of it): a multiple-choice item's options share its question.

    context_ids, context_mask: (m, Tc), left-padded contexts (each at least one token);
    ids, mask: (n, Tr), right-padded continuations; owner: (n,), the context row of each continuation.
    The scored sequences are [last context token, continuation], (n, 1 + Tr): :attr:`input_ids` and
    :attr:`completion_mask` (1 on continuation tokens), as a plain batch's would be for its last
    prompt token on.
    """

    context_ids: torch.Tensor
    context_mask: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    owner: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.context_ids[self.owner, -1:], self.ids], dim=1)

    @property
    def completion_mask(self) -> torch.Tensor:
        return torch.cat([torch.zeros_like(self.mask[:, :1]), self.mask], dim=1)

    def to(self, device: torch.device | str) -> "SharedContexts":
        return SharedContexts(**{k: v.to(device) for k, v in vars(self).items()})


def pad_shared(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_token_id: int) -> SharedContexts:
    """(context ids, [continuation ids, …]) groups → :class:`SharedContexts`.

    Example, contexts (5, 6) and (7,), continuations [(8,), (9, 10)] and [(11,)], pad 0::

        context_ids = [[5, 6], [0, 7]]   ids = [[8, 0], [9, 10], [11, 0]]   owner = [0, 0, 1]
    """
    if not groups or any(not context for context, _ in groups):
        raise ValueError("pad_shared needs groups, each with a non-empty context (the state its first continuation token is scored from)")
    context_ids, context_mask, _ = pad_rows([(context, ()) for context, _ in groups], pad_token_id, "left")
    continuations = [(i, c) for i, (_, group) in enumerate(groups) for c in group]
    ids, mask, _ = pad_rows([((), c) for _, c in continuations], pad_token_id)
    return SharedContexts(context_ids, context_mask, ids, mask, torch.tensor([i for i, _ in continuations]))


def prompt_grouped_batches(pairs: list[TokenizedPair], batch_size: int, seed: int | None = None) -> list[list[int]]:
    """Indices of ``pairs`` in batches of ``batch_size``, pairs with the same prompt kept adjacent
    so their shared responses are scored once (see :func:`collate_pairs`).

    ``seed`` shuffles the order of prompt groups (and pairs inside a group); ``None`` keeps file
    order. The last batch may be smaller.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair.prompt, []).append(i)
    ordered = list(groups.values())
    if seed is not None:
        rng = random.Random(seed)
        rng.shuffle(ordered)
        for group in ordered:
            rng.shuffle(group)
    flat = [i for group in ordered for i in group]
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]
