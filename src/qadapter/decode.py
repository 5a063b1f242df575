"""Generating with the customized policy: prompt → every pass in one forward per step → combined logits → tokens.

The skeleton of nanoGPT's ``generate`` with the passes the policy reads (each adapter's and the
base's) stacked as rows of one forward with one KV cache, and one combined-logits line. ``alpha_0``,
``alpha_tilde`` and the adapter ``weights`` can be overridden per call: the forgetting dial needs no
retraining.

One engine: :class:`DecodeBatch` runs the forwards, and :func:`decode_step` turns one step's logits
into tokens for every running :class:`Stream` (EOS barred below its ``min_tokens``, one draw per
sampling setting or per stream with its own generator, the policy's log-probabilities where asked,
EOS / stop strings / ``max_tokens`` ending it). :func:`generate_ids`, the server's
scheduler and the lm-eval plugin all drive these two; they differ only in when sequences join and leave.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from . import objective
from .collate import eos_ids as collate_eos_ids
from .collate import pad_rows
from .config import DecodeConfig, Dial
from .data import Message
from .hardware import MixedPrecision, autocast, choose_mixed_precision
from .model import position_ids
from .sampling import Sampling, sample_next
from .objective_hidden import base_coefficient, combined_hidden
from .trunk import Segment, lora_layers, mixed_batch

Policy = Literal["customized", "base"]
Prompt = str | list[Message]
BASE = "__base__"  # PEFT's mixed-batch name for "no adapter"


def token_rows(tokenizer: Any, prompts: Sequence[Prompt], chat: bool = True) -> list[list[int]]:
    """Token ids per prompt. A string becomes a user turn when ``chat`` and the tokenizer has a
    chat template; a message list always goes through the template."""
    rows = []
    for prompt in prompts:
        if isinstance(prompt, list) or (chat and getattr(tokenizer, "chat_template", None)):
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            rows.append(tokenizer(prompt)["input_ids"])
    return rows


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], chat: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids, mask), (b, T), of :func:`token_rows`."""
    ids, mask, _ = pad_rows([(row, []) for row in token_rows(tokenizer, prompts, chat)], tokenizer.pad_token_id, "left")
    return ids, mask


def eos_ids(qmodel: Any) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS and the generation config's."""
    return sorted(collate_eos_ids(qmodel.tokenizer, getattr(qmodel.peft_model.generation_config, "eos_token_id", None)))


@dataclass(frozen=True)
class Mixture:
    """The policy one sequence decodes with, (Σ_i w_i·Q_i + α₀ log π₁)/α̃: a resolved :class:`Dial` laid out
    for decoding, (adapter name, w_i, Q form) per adapter of non-zero weight. No adapters at α₀ = α̃ = 1
    is the base policy itself."""

    adapters: tuple[tuple[str, float, str], ...]
    alpha_0: float
    alpha_tilde: float

    @property
    def pass_names(self) -> tuple[str, ...]:
        """The passes this policy reads: one per adapter, and the base unless its logits cancel
        (:func:`~qadapter.objective_hidden.base_coefficient`)."""
        names = tuple(name for name, _, _ in self.adapters)
        cancels = base_coefficient(self.alpha_0, [(weight, form) for _, weight, form in self.adapters]) == 0
        return names if names and cancels else (*names, BASE)


def mixture(qmodel: Any, dial: Dial = Dial(), policy: Policy = "customized") -> Mixture:
    """The policy a call asks for: ``dial`` resolved against the loaded adapters (weight 0 leaves one
    out), or the base policy."""
    if policy == "base":
        return Mixture((), 1.0, 1.0)
    dial = dial.resolve(qmodel.adapters)
    return Mixture(
        tuple((name, w, qmodel.adapters[name].q_form) for name, w in dial.weights.items() if w != 0),  # type: ignore[union-attr]
        dial.alpha_0,  # type: ignore[arg-type]
        dial.alpha_tilde,  # type: ignore[arg-type]
    )


def customized_logits(logits: Mapping[str, torch.Tensor], mix: Mixture) -> torch.Tensor:
    """Next-token logits of the policy ``mix`` from one step's passes: ``logits`` maps each of
    ``mix.pass_names`` (adapter names, and BASE) to its (b, V) logits. Returns (b, V)."""
    base = logits.get(BASE)
    if base is None:  # the base terms cancel (see Mixture.pass_names): Σ w_i·a_i / α̃, up to a constant per row
        return sum(w * logits[name] for name, w, _ in mix.adapters) / mix.alpha_tilde  # type: ignore[return-value]
    q = sum((w * objective.q_values(logits[name], base, form) for name, w, form in mix.adapters), torch.zeros_like(base))  # type: ignore[arg-type]
    return objective.combined_logits(q, F.log_softmax(base, -1), mix.alpha_0, mix.alpha_tilde)


def customized_hidden(hidden: Mapping[str, torch.Tensor], mix: Mixture) -> torch.Tensor:
    """For models whose logits are W·h: the final hidden state whose projection is the policy's
    logits up to a constant per row, :func:`~qadapter.objective_hidden.combined_hidden` / α̃. ``hidden`` maps each
    pass to its (b, d) states. Returns (b, d)."""
    adapters = [(hidden[name], w, form) for name, w, form in mix.adapters]
    return combined_hidden(adapters, hidden.get(BASE), mix.alpha_0) / mix.alpha_tilde


class DecodeBatch:
    """Sequences stepping through ONE forward per step with ONE KV cache.

    A sequence contributes one row per pass its :class:`Mixture` reads, grouped by sequence, and
    PEFT's mixed-batch LoRA (``adapter_names``, ``"__base__"`` for base rows) applies each row's
    adapter, so all passes of all sequences share every weight read: a small batch costs about one
    pass, not one per adapter. With a shared trunk (adapters on the top layers only, see trunk.py)
    the layers below the adapted ones see one row per sequence, and their cache layers hold one row
    per sequence; only the adapted layers see (and cache) one row per pass. Sequences join (:meth:`add`:
    their prompts run through one prefill forward and their cache rows are appended, everything
    left-padded to one length; positions are explicit, so padding in front changes nothing) and leave
    (:meth:`keep`) between steps.
    """

    def __init__(self, qmodel: Any, precision: MixedPrecision | None = None) -> None:
        """``precision``: None decodes in what the hardware does best (``auto``); evaluation passes its own."""
        self.model = qmodel.peft_model
        self.device = qmodel.device
        # Where logits are W·h, combine final hidden states and project once per sequence: the
        # vocabulary projection is the largest matrix, and on a CPU two rows cost it more than twice one.
        self.head = qmodel.peft_model.get_output_embeddings().weight if qmodel.hidden_path else None
        self.precision = choose_mixed_precision(self.device) if precision is None else precision
        self.trunk = qmodel.trunk
        self.lora = lora_layers(self.model)  # every LoRA layer, for PEFT's mixed batch (see trunk.mixed_batch)
        self.mixtures: list[Mixture] = []  # per sequence
        self.cache: Any = None  # over all rows (shared layers: over all sequences)
        # a sequence's passes see the same tokens: mask and positions are kept per sequence
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (n, L)
        self.pos = torch.zeros(0, 1, dtype=torch.long, device=self.device)  # (n, 1): position of each sequence's last token

    @property
    def can_join(self) -> bool:
        """Sequences can join an empty batch, and a running one whose cache layers are all plain (a
        sliding-window layer keeps a fixed window that padding in front would shift)."""
        return self.cache is None or all(window is None for _, _, window in self.cache)

    def add(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mixtures: Sequence[Mixture]) -> torch.Tensor:
        """Prefill new sequences, left-padded (n, T) prompts with one mixture each, in one forward; they
        join after the running ones. Returns their next-token logits, (n, V)."""
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)  # (n, T)
        pos = position_ids(mask)
        rows_out, cache = self._forward(ids, mask, pos, None, mixtures)
        self.cache, self.mask = _join_caches(self.cache, self.mask, cache, mask)
        self.pos = torch.cat([self.pos, pos[:, -1:]])
        self.mixtures += mixtures
        return self._logits(rows_out, mixtures)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence, (n,); returns each sequence's next-token logits, (n, V)."""
        self.mask = F.pad(self.mask, (0, 1), value=1)  # (n, L+1)
        self.pos = self.pos + 1
        rows_out, self.cache = self._forward(tokens.to(self.device).unsqueeze(1), self.mask, self.pos, self.cache, self.mixtures)
        return self._logits(rows_out, self.mixtures)

    def keep(self, indices: Sequence[int]) -> None:
        """Keep these sequences, in this order; the others leave, with their cache rows."""
        if list(indices) == list(range(len(self.mixtures))):
            return  # nobody leaves: spare the cache a copy
        starts = _starts(self.mixtures)
        rows = [r for i in indices for r in range(starts[i], starts[i] + len(self.mixtures[i].pass_names))]
        row_index = torch.tensor(rows, dtype=torch.long, device=self.device)
        index = torch.tensor(list(indices), dtype=torch.long, device=self.device)
        self.mixtures = [self.mixtures[i] for i in indices]
        self.mask, self.pos = self.mask[index], self.pos[index]
        if not rows:
            self.cache, self.mask = None, self.mask[:, :0]
            return
        if self.trunk is not None:
            self.trunk.keep(self.cache, index, row_index)  # shared layers: by sequence; adapted layers: by pass row
        else:
            self.cache.batch_select_indices(row_index)
        start = int(self.mask.any(0).long().argmax())  # columns before it are padding in every sequence left
        if start:
            self.cache = _rebuild(self.cache, lambda t: t[..., start:, :])
            self.mask = self.mask[:, start:]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, mixtures: Sequence[Mixture]) -> tuple[torch.Tensor, Any]:
        """One forward over (n, q) tokens of these sequences, with their (n, L) mask and (n, q) positions: each
        pass row's last final hidden state (rows, d), or its last logits (rows, V) without the hidden path."""
        owner, names = _layout(mixtures)
        rows = torch.tensor(owner, dtype=torch.long, device=self.device)
        with autocast(self.device, self.precision):
            if self.trunk is not None:
                return self.trunk.decode(Segment(ids, mask, pos), rows, names, cache, logits=self.head is None)
            # logits_to_keep: an empty index asks the model for no logits at all on the hidden path
            keep = torch.empty(0, dtype=torch.long, device=self.device) if self.head is not None else 1
            with mixed_batch(self.lora, names):
                out = self.model(
                    input_ids=ids[rows],
                    attention_mask=mask[rows],
                    position_ids=pos[rows],
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=keep,
                    output_hidden_states=self.head is not None,
                )
        last = out.hidden_states[-1] if self.head is not None else out.logits
        return last[:, -1].float(), out.past_key_values

    def _logits(self, rows_out: torch.Tensor, mixtures: Sequence[Mixture]) -> torch.Tensor:
        """Each sequence's customized logits, (n, V), from its rows' outputs."""
        if self.head is None:
            return _combine(rows_out, mixtures, customized_logits)
        hidden = _combine(rows_out, mixtures, customized_hidden)  # (n, d)
        return F.linear(hidden.to(self.head.dtype), self.head).float()  # one projection per sequence


def _layout(mixtures: Sequence[Mixture]) -> tuple[list[int], list[str]]:
    """The rows of these sequences: each row's sequence and pass, rows grouped by sequence."""
    owner = [i for i, m in enumerate(mixtures) for _ in m.pass_names]
    return owner, [name for m in mixtures for name in m.pass_names]


def _starts(mixtures: Sequence[Mixture]) -> list[int]:
    """The first row of each sequence."""
    starts, row = [], 0
    for m in mixtures:
        starts.append(row)
        row += len(m.pass_names)
    return starts


def _combine(
    rows_out: torch.Tensor, mixtures: Sequence[Mixture], mix_fn: Callable[[Mapping[str, torch.Tensor], Mixture], torch.Tensor]
) -> torch.Tensor:
    """Each sequence's combination of its rows' outputs, (rows, X) → (n, X), one ``mix_fn``
    (:func:`customized_logits` or :func:`customized_hidden`) call per distinct mixture."""
    starts = torch.tensor(_starts(mixtures), device=rows_out.device)
    groups: dict[Mixture, list[int]] = {}
    for i, m in enumerate(mixtures):
        groups.setdefault(m, []).append(i)
    out = rows_out.new_empty(len(mixtures), rows_out.shape[-1])
    for m, seqs in groups.items():
        first = starts[seqs]
        out[seqs] = mix_fn({name: rows_out[first + j] for j, name in enumerate(m.pass_names)}, m)
    return out


def _rebuild(cache: Any, edit: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A new cache whose key and value tensors, (rows, heads, L, d), are ``edit`` of the old ones."""
    from transformers import DynamicCache

    return DynamicCache([(edit(keys), edit(values)) for keys, values, _ in cache])


def _join_caches(cache: Any, mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """One cache and (n, L) mask holding the rows of both, the shorter left-padded (layer by layer: shared
    layers hold rows per sequence, adapted ones per pass)."""
    if cache is None:
        return new_cache, new_mask
    from transformers import DynamicCache

    width = max(mask.shape[1], new_mask.shape[1])

    def grow(t: torch.Tensor) -> torch.Tensor:  # (rows, heads, L, d) → (rows, heads, width, d)
        return F.pad(t, (0, 0, width - t.shape[-2], 0))

    layers = [
        (torch.cat([grow(k), grow(new_k)]), torch.cat([grow(v), grow(new_v)]))
        for (k, v, _), (new_k, new_v, _) in zip(cache, new_cache)
    ]
    return DynamicCache(layers), torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in (mask, new_mask)])


def _borders(pattern: str) -> list[int]:
    """KMP's failure function: ``borders[i]`` is the length of the longest proper prefix of
    ``pattern[: i + 1]`` that is also a suffix of it. O(len(pattern))."""
    borders = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = borders[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        borders[i] = k
    return borders


class StopMatcher:
    """Finds the first stop string in text that arrives in pieces, in time linear in the text.

    One KMP automaton per stop string; its state, the longest prefix of that stop string that ends
    the text so far, carries over between pieces, so a character costs amortized O(1) per stop
    string however long the text or the stop strings. Only the end of the text that may still begin
    a stop string (fewer than max(len(stop)) characters) is held back; the rest is released.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.borders = [_borders(stop) for stop in self.stops]
        self.state = [0] * len(self.stops)
        self.held = ""  # the end of the text that may begin a stop string

    def feed(self, piece: str) -> tuple[str, bool]:
        """Append ``piece``; returns the text now certain (ending before the earliest-starting stop
        string, if one has appeared) and whether one has."""
        text = self.held + piece
        cut: int | None = None
        for i, (stop, borders) in enumerate(zip(self.stops, self.borders)):
            k = self.state[i]
            for end, char in enumerate(piece, len(self.held) + 1):
                while k and stop[k] != char:
                    k = borders[k - 1]
                if stop[k] == char:
                    k += 1
                if k == len(stop):  # its first occurrence, so its earliest start
                    cut = end - k if cut is None else min(cut, end - k)
                    break
            self.state[i] = k
        if cut is not None:
            return text[:cut], True
        keep = len(text) - max(self.state, default=0)
        self.held = text[keep:]
        return text[:keep], False

    def flush(self) -> str:
        """The held-back text, once the text has ended without a stop string."""
        held, self.held = self.held, ""
        return held


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability under its stream's policy, and the ``top`` most likely
    tokens' as (id, log-probability), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)  # compared and hashed by identity
class Stream:
    """One sequence being decoded: the policy it samples, how, until when, and what it has produced."""

    mixture: Mixture
    sampling: Sampling
    max_tokens: int
    min_tokens: int = 0  # EOS is barred until this many tokens
    stop: StopMatcher | None = None  # stop strings; None: the text is not followed (nothing is detokenized)
    # its own draws (a seeded request): its tokens then depend on neither the other streams nor when they run
    generator: torch.Generator | None = None
    top_logprobs: int | None = None  # record each token's log-probability and this many alternatives; None: none
    tokens: list[int] = field(default_factory=list)  # generated, EOS excluded
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token of `tokens`, when recorded
    finish: str | None = None  # once it has ended: "stop" (EOS or a stop string), "length", or the caller's reason
    window: tuple[int, int] = (0, 0)  # incremental detokenization: (prefix, read) offsets into `tokens`

    def take(self, token: int, eos: Collection[int], tokenizer: Any, logprobs: TokenLogprobs | None = None) -> str:
        """Append one sampled token (and its ``logprobs``) and return the text it completes (with stop
        strings followed); sets :attr:`finish` when the stream ends."""
        if token in eos:
            self.finish = "stop"
            return self.stop.flush() if self.stop is not None else ""
        self.tokens.append(token)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        text, stopped = self.stop.feed(self._next_text(tokenizer)) if self.stop is not None else ("", False)
        if stopped:
            self.finish = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.finish = "length"
            text += self.stop.flush() if self.stop is not None else ""
        return text

    def _next_text(self, tokenizer: Any) -> str:
        """The text the newest token adds. Decoding a short window twice and keeping the difference
        (as TGI does) keeps merges and multi-byte characters whole without re-decoding everything."""
        prefix, read = self.window
        before = tokenizer.decode(self.tokens[prefix:read], skip_special_tokens=True)
        after = tokenizer.decode(self.tokens[prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):  # U+FFFD: an incomplete character
            self.window = (read, len(self.tokens))
            return after[len(before) :]
        return ""


def decode_step(
    logits: torch.Tensor, streams: Sequence[Stream], eos: Sequence[int], pad: int, tokenizer: Any = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """The step every decoder drives: one token per stream from its row of ``logits``, (n, V) → (n,),
    and the text each token completes. EOS is barred for streams below their ``min_tokens``; streams
    sharing a sampling setting share one draw from ``generator``, and a stream with its own generator
    draws alone from it; a stream that had already ended gets ``pad`` and no text. Streams asking for
    log-probabilities get them from the log-softmax of their row as it comes: the policy itself, before
    temperature, top-k, top-p and the EOS bar (vLLM's default, ``raw_logprobs``).
    ``tokenizer`` is needed only for streams with stop strings."""
    asking = [i for i, s in enumerate(streams) if s.top_logprobs is not None and s.finish is None]
    logprobs = logits[asking].float().log_softmax(-1) if asking else None  # (r, V), a copy: untouched by the EOS bar
    early = [i for i, s in enumerate(streams) if len(s.tokens) < s.min_tokens]
    if early:
        logits[torch.tensor(early, device=logits.device).unsqueeze(1), torch.tensor(list(eos), device=logits.device)] = float("-inf")
    tokens = torch.empty(len(streams), dtype=torch.long, device=logits.device)
    groups: dict[tuple[Sampling, torch.Generator | None], list[int]] = {}
    for i, s in enumerate(streams):
        groups.setdefault((s.sampling, s.generator), []).append(i)
    for (sampling, own), rows in groups.items():
        tokens[rows] = sample_next(
            logits[rows], temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            generator=own if own is not None else generator,
        )
    recorded = dict(zip(asking, _token_logprobs(logprobs, tokens[asking], [streams[i].top_logprobs for i in asking]))) if asking else {}
    texts = []
    for i, (s, token) in enumerate(zip(streams, tokens.tolist())):  # one CPU-GPU sync per step
        if s.finish is not None:
            tokens[i] = pad
            texts.append("")
        else:
            texts.append(s.take(token, eos, tokenizer, recorded.get(i)))
    return tokens, texts


def _token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, tops: Sequence[int]) -> list[TokenLogprobs]:
    """Each row's chosen token with its log-probability and its ``tops[row]`` most likely alternatives; (r, V), (r,)."""
    chosen = logprobs.gather(-1, tokens.unsqueeze(1)).squeeze(1).tolist()
    values, ids = logprobs.topk(max(tops), dim=-1)  # (r, k)
    values, ids = values.tolist(), ids.tolist()
    return [
        TokenLogprobs(token, logprob, tuple(zip(ids[row][:k], values[row][:k])))
        for row, (token, logprob, k) in enumerate(zip(tokens.tolist(), chosen, tops))
    ]


@torch.no_grad()
def generate_ids(
    qmodel: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: DecodeConfig = DecodeConfig(),
    policy: Policy = "customized",
    precision: MixedPrecision | None = None,
) -> torch.Tensor:
    """New token ids, (b, T) → (b, n ≤ max_new_tokens), rows padded after their EOS; ``precision``
    as :class:`DecodeBatch`. Ended rows stay in the batch (feeding padding nobody reads), so a seeded
    draw does not depend on when the other rows end."""
    generator = torch.Generator(device=qmodel.device).manual_seed(config.seed) if config.seed is not None else None
    policy_mix = mixture(qmodel, config.dial, policy)
    streams = [
        Stream(policy_mix, Sampling(config.temperature, config.top_p), config.max_new_tokens, config.min_new_tokens) for _ in range(input_ids.shape[0])
    ]
    eos, pad = eos_ids(qmodel), qmodel.tokenizer.pad_token_id
    batch = DecodeBatch(qmodel, precision)
    new_tokens = []
    was_training = qmodel.training
    qmodel.set_training(False)  # PEFT's mixed batch refuses training mode
    try:
        logits = batch.add(input_ids, attention_mask, [s.mixture for s in streams])  # (b, V)
        while True:
            tokens, _ = decode_step(logits, streams, eos, pad, generator=generator)  # (b,)
            new_tokens.append(tokens)
            if all(s.finish is not None for s in streams):
                break
            logits = batch.step(tokens)
    finally:
        qmodel.set_training(was_training)
    return torch.stack(new_tokens, dim=1)  # (b, n)


def generate(
    qmodel: Any,
    prompts: Prompt | Sequence[Prompt],
    config: DecodeConfig = DecodeConfig(),
    policy: Policy = "customized",
    chat: bool = True,
    precision: MixedPrecision | None = None,
) -> list[str]:
    """Generate a completion per prompt with the customized (or the base) policy."""
    batch = [prompts] if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)) else list(prompts)
    ids, mask = encode_prompts(qmodel.tokenizer, batch, chat)  # type: ignore[arg-type]
    out = generate_ids(qmodel, ids, mask, config, policy, precision)
    return [qmodel.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out.tolist()]
