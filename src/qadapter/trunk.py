"""The shared trunk: the layers below the lowest adapted one run once, for the base pass and every adapter pass.

With LoRA on the top K of L decoder layers (``QAdapterConfig.adapt_layers``, PEFT's ``layers_to_transform``),
the bottom L − K layers compute the same thing whether an adapter is on or off. :class:`Trunk` drives the
decoder's own modules (embeddings, rotary embedding, decoder layers, final norm), with the causal mask the
library's own helper (``transformers.masking_utils.create_causal_mask``) builds, so that the bottom runs once
and only the top runs per pass: in training and scoring (one row per sequence everywhere, the top once per
pass) and in decoding (one row per sequence below, one row per pass above, one KV cache). Nothing of the
library is replaced; the numbers are the full model's, and are checked against it once, numerically, when
the trunk is found.

Known families: decoders laid out as transformers' Llama (Llama, Mistral, Qwen2, Qwen3; SmolLM2 is a Llama)
whose layers all use full attention. Any other model runs the unshared path (every pass through the whole
model), with a one-line notice where it has unadapted bottom layers that could have been shared.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("qadapter")

FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # config.model_type of the decoders driven here


@dataclass(frozen=True)
class Segment:
    """Rows run through the decoder in one forward: ``ids`` (b, q); ``mask`` (b, past + q), 1 on real tokens of
    the past and of these rows; ``positions`` (b, q); ``rows`` (b,), the row of the previous segment whose KV
    cache each row continues (None: the first segment, no past); ``last_only``: only the last position's output
    is read (a context whose cache serves the next segment)."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor | None = None
    last_only: bool = False


@dataclass(frozen=True)
class Frame:
    """What every decoder layer of one forward reads besides the hidden states: the library's causal mask
    (None where SDPA's own causal path serves) and the rotary position embeddings. Built before any layer of
    that forward runs, since the mask is sized by the cache's past length."""

    mask: Any
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    positions: torch.Tensor


class Trunk:
    """A supported decoder split at ``split``, its lowest adapted layer: layers ``[0, split)`` are shared."""

    def __init__(self, peft_model: Any, decoder: Any, split: int) -> None:
        self.peft_model = peft_model
        self.decoder = decoder
        self.split = split
        self.below = range(split)
        self.above = range(split, len(decoder.layers))
        head = peft_model.get_output_embeddings()
        self.lora_above = lora_layers(*(decoder.layers[i] for i in self.above), head)  # where decoding's adapter names go

    # --- pieces: the decoder's own modules, as its forward calls them ---------------------------------

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.decoder.config)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(ids)

    def frame(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, layer: int) -> Frame:
        """The mask and position embeddings of rows whose embeddings are ``embeds`` (b, q, d), sized by the past
        ``cache`` holds at ``layer`` (every layer of a cache holds the same past, so any one that is filled will do)."""
        from transformers.masking_utils import create_causal_mask

        causal = create_causal_mask(
            config=self.decoder.config, inputs_embeds=embeds, attention_mask=mask, cache=cache, position_ids=positions, layer_idx=layer
        )
        return Frame(causal, self.decoder.rotary_emb(embeds, positions), positions)

    def run(self, hidden: torch.Tensor, frame: Frame, layers: range, cache: Any) -> torch.Tensor:
        """``layers`` of the decoder over ``hidden`` (b, q, d), as the decoder's forward calls them."""
        for i in layers:
            hidden = self.decoder.layers[i](
                hidden,
                attention_mask=frame.mask,
                position_ids=frame.positions,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=frame.position_embeddings,
            )
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states (the output layer's LoRA applies where the adapter is on)."""
        return self.peft_model.get_output_embeddings()(hidden)

    # --- training and scoring: the bottom once, the top per pass ---------------------------------------

    def _cache(self, segments: Sequence[Segment]) -> Any:
        """A KV cache where a segment continues another; none for one segment (as a forward with use_cache=False)."""
        return self.new_cache() if len(segments) > 1 else None

    def bottom(self, segments: Sequence[Segment]) -> tuple[list[torch.Tensor], list[Frame]]:
        """Embeddings and the shared layers over ``segments`` in turn (each continuing the cache of the one
        before), with no autograd graph: hidden states entering layer ``split``, and each segment's frame."""
        cache = self._cache(segments)
        hidden, frames = [], []
        with torch.no_grad():
            for segment in segments:
                if segment.rows is not None:
                    select_rows(cache, segment.rows, self.below)
                embeds = self.embed(segment.ids)
                frames.append(self.frame(embeds, segment.mask, segment.positions, cache, 0))
                hidden.append(self.run(embeds, frames[-1], self.below, cache))
        return hidden, frames

    def top(self, hidden: Sequence[torch.Tensor], segments: Sequence[Segment], frames: Sequence[Frame], logits: bool) -> list[torch.Tensor]:
        """The adapted layers and the final norm over the bottom's output, segment by segment with a cache of
        their own, under whatever adapter context the caller set: final hidden states, or ``logits`` (of the last
        position alone for a ``last_only`` segment)."""
        cache = self._cache(segments)
        out = []
        for h, segment, frame in zip(hidden, segments, frames):
            if segment.rows is not None:
                select_rows(cache, segment.rows, self.above)
            h = self.run(h, frame, self.above, cache)
            final = self.decoder.norm(h[:, -1:] if segment.last_only else h)
            out.append(self.head(final) if logits else final)
        return out

    def passes(self, segments: Sequence[Segment], logits: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(base pass, adapter pass) final hidden states or logits of each segment, the bottom run once. The base
        pass builds no autograd graph; the adapter pass builds one where gradients are enabled."""
        hidden, frames = self.bottom(segments)
        with torch.no_grad(), self.peft_model.disable_adapter():
            base = self.top(hidden, segments, frames, logits)
        return base, self.top(hidden, segments, frames, logits)

    # --- decoding: one row per sequence below, one row per pass above ----------------------------------

    def decode(
        self, segment: Segment, owner: torch.Tensor, names: list[str], cache: Any, logits: bool
    ) -> tuple[torch.Tensor, Any]:
        """One decoding forward over ``segment`` (one row per sequence), with ``cache`` (None: a new one)
        whose shared layers hold one row per sequence and whose adapted layers one row per pass: ``owner``
        (rows,) is each pass row's sequence and ``names`` its PEFT adapter (``"__base__"``: none), applied
        by PEFT's mixed-batch LoRA as in a whole-model forward. Returns the last position's final hidden
        state (or ``logits``) per pass row, (rows, d or V) in float32, and the cache."""
        cache = cache if cache is not None else self.new_cache()
        embeds = self.embed(segment.ids)
        # both frames before any layer runs: the cache's past length sizes them
        below = self.frame(embeds, segment.mask, segment.positions, cache, 0)
        above = self.frame(embeds[owner], segment.mask[owner], segment.positions[owner], cache, 0)
        hidden = self.run(embeds, below, self.below, cache)[owner]
        with mixed_batch(self.lora_above, names):
            last = self.decoder.norm(self.run(hidden, above, self.above, cache)[:, -1:])
            out = self.head(last) if logits else last
        return out[:, -1].float(), cache

    def keep(self, cache: Any, sequences: torch.Tensor, rows: torch.Tensor) -> None:
        """Keep these ``sequences`` in the shared layers and these pass ``rows`` in the adapted ones."""
        select_rows(cache, sequences, self.below)
        select_rows(cache, rows, self.above)


def lora_layers(*modules: Any) -> list[Any]:
    """PEFT's LoRA layers inside ``modules``, each once."""
    from peft.tuners.lora import LoraLayer

    found = {id(m): m for module in modules for m in module.modules() if isinstance(m, LoraLayer)}
    return list(found.values())


@contextlib.contextmanager
def mixed_batch(layers: Sequence[Any], names: list[str]) -> Iterator[None]:
    """PEFT's mixed-batch LoRA: each of these LoRA ``layers`` gets ``adapter_names`` (row i through adapter
    ``names[i]``, ``"__base__"``: none), the argument PEFT's LoRA layers take for it, through a forward pre-hook
    as ``PeftModel.forward(adapter_names=...)`` passes it; the layers check it themselves. The layers are found
    once per batch rather than per forward: PEFT's own context walks every module of the model twice per
    forward, a fifth to a third of a small model's decoding step."""

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, {**kwargs, "adapter_names": names}

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def select_rows(cache: Any, index: torch.Tensor, layers: range) -> None:
    """Keep (or repeat) the rows ``index`` of the cache's ``layers`` (autograd follows the indexing)."""
    for i in layers:
        cache.layers[i].batch_select_indices(index)


# ---------------------------------------------------------------------------------------------
# Finding the trunk


def lowest_adapted_layer(peft_model: Any, decoder: Any) -> int:
    """The index of the lowest decoder layer holding LoRA of any loaded adapter; 0 where LoRA sits below the
    layers (the embeddings) or is found nowhere inside them, so that nothing is shared."""
    from peft.tuners.lora import LoraLayer

    layer_of = {id(m): i for i, layer in enumerate(decoder.layers) for m in layer.modules()}
    head = peft_model.get_output_embeddings()
    lowest = len(decoder.layers)
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer) or module is head:  # the output layer is above every layer
            continue
        if id(module) not in layer_of:
            return 0
        lowest = min(lowest, layer_of[id(module)])
    return lowest if lowest < len(decoder.layers) else 0


def unsupported(peft_model: Any) -> str | None:
    """Why the trunk cannot drive this model's decoder, or None."""
    from transformers import masking_utils

    base = peft_model.get_base_model()
    config = base.config
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} is not one it knows ({', '.join(sorted(FAMILIES))})"
    decoder = base.get_decoder()
    if not all(hasattr(decoder, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return f"the {kind} decoder ({type(decoder).__name__}) is not laid out as transformers' Llama"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or (kind == "mistral" and getattr(config, "sliding_window", None) is not None):
        return "it has sliding-window attention layers"
    if "layer_idx" not in inspect.signature(masking_utils.create_causal_mask).parameters or "cache" not in inspect.signature(
        decoder.layers[0].forward
    ).parameters:
        return "this transformers version's decoder layers take other arguments (transformers 5 is needed)"
    return None


def find_trunk(peft_model: Any) -> Trunk | None:
    """The shared trunk of a PEFT model whose loaded adapters leave its bottom layers unadapted, or None: every
    layer adapted (nothing to share), or an architecture the trunk does not know (one notice, then the
    unshared path), or a trunk whose numbers differ from the whole model's (the same)."""
    configs = getattr(peft_model, "peft_config", {}).values()
    if not any(getattr(c, "layers_to_transform", None) is not None for c in configs):
        return None  # every layer adapted
    reason = unsupported(peft_model)
    if reason is None:
        decoder = peft_model.get_base_model().get_decoder()
        split = lowest_adapted_layer(peft_model, decoder)
        if split == 0:
            return None
        trunk = Trunk(peft_model, decoder, split)
        if _agrees(trunk):
            return trunk
        reason = "its layers, driven one by one, do not reproduce the whole model's numbers"
    log.warning("qadapter: the shared trunk cannot serve this model (%s); every pass runs through the whole model", reason)
    return None


@torch.no_grad()
def _agrees(trunk: Trunk) -> bool:
    """Check once, numerically, that the trunk's base pass is the whole model's: final hidden states of a few
    tokens, with a prompt segment and a continuation of it (the path decoding and shared prompts take)."""
    model = trunk.peft_model
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.arange(min(8, vocab), device=device).unsqueeze(0)  # (1, 8)
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1], device=device).unsqueeze(0)
    cut = ids.shape[1] // 2
    segments = [
        Segment(ids[:, :cut], mask[:, :cut], positions[:, :cut]),
        Segment(ids[:, cut:], mask, positions[:, cut:], rows=torch.zeros(1, dtype=torch.long, device=device)),
    ]
    modes = {module: module.training for module in model.modules()}  # a model fresh from a trainer may be in training mode
    model.eval()  # so that no dropout makes the two differ
    try:
        with model.disable_adapter():
            whole = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, output_hidden_states=True, logits_to_keep=1)
            hidden, frames = trunk.bottom(segments)
            mine = torch.cat(trunk.top(hidden, segments, frames, logits=False), dim=1).float()
    finally:
        for module, training in modes.items():
            module.training = training
    expected = whole.hidden_states[-1].float()
    if mine.shape != expected.shape:
        return False
    # rounding of the dtype (a cached continuation adds a little); a wrong mask, position or layer is off by O(1)
    tolerance = max(1e-4, 16 * torch.finfo(whole.hidden_states[-1].dtype).eps)
    return bool((mine - expected).norm() <= tolerance * expected.norm())
