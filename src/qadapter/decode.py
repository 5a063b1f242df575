"""Generating with the customized policy: prompt → two KV caches → combined logits → tokens.

The skeleton of nanoGPT's ``generate`` with one second forward (the base pass, adapter
disabled, its own cache) and one combined-logits line. ``alpha_0`` and ``alpha_tilde`` can be
overridden per call: the forgetting dial needs no retraining.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from . import objective
from .config import DecodeConfig
from .data import Message
from .hardware import autocast, choose_mixed_precision
from .model import position_ids
from .sampling import sample_next

Policy = Literal["customized", "base"]
Prompt = str | list[Message]


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], chat: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids, mask), (b, T). A string becomes a user turn when ``chat`` and the
    tokenizer has a chat template; a message list always goes through the template."""
    rows = []
    for prompt in prompts:
        if isinstance(prompt, list) or (chat and getattr(tokenizer, "chat_template", None)):
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            rows.append(tokenizer(prompt)["input_ids"])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


class _Passes:
    """Adapted and base rows stepping through ONE forward with ONE KV cache.

    The batch is [adapted rows; base rows] and PEFT's mixed-batch LoRA (``adapter_names``, with
    ``"__base__"`` for the base rows) applies the adapter to the first half only, so both passes
    share every weight read: decoding a small batch costs about one pass, not two. Where the
    customized policy needs a single pass (the base alone, or the residual form at α₀ = 1, where
    π̃ = softmax(adapted logits / α̃)) only that pass runs.
    """

    def __init__(self, qmodel: Any, rows: int, policy: Policy, alpha_0: float) -> None:
        self.model = qmodel.peft_model
        self.rows = rows
        adapter = self.model.active_adapter
        if policy == "base":
            self.names = ["__base__"] * rows
        elif qmodel.config.q_form == "residual" and alpha_0 == 1.0:
            self.names = [adapter] * rows
        else:
            self.names = [adapter] * rows + ["__base__"] * rows
        self.cache: Any = None

    def step(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Feed new tokens (b, t); return (adapted logits, base logits) at the last position, (b, V) each or None."""
        copies = len(self.names) // self.rows
        out = self.model(
            input_ids=ids.repeat(copies, 1),
            attention_mask=mask.repeat(copies, 1),
            position_ids=pos.repeat(copies, 1),
            past_key_values=self.cache,
            use_cache=True,
            adapter_names=self.names,
            logits_to_keep=1,
        )
        self.cache = out.past_key_values
        logits = out.logits[:, -1].float()  # (copies·b, V)
        if copies == 2:
            return logits[: self.rows], logits[self.rows :]
        return (None, logits) if self.names[0] == "__base__" else (logits, None)


def customized_logits(
    adapter_logits: torch.Tensor | None, base_logits: torch.Tensor | None, q_form: str, alpha_0: float, alpha_tilde: float
) -> torch.Tensor:
    """Next-token logits of the customized policy from whichever passes ran, (b, V) → (b, V)."""
    if adapter_logits is None:
        return base_logits  # type: ignore[return-value]  # the base policy alone
    if base_logits is None:  # residual form at α₀ = 1: (a − b + log softmax(b))/α̃ = a/α̃ − const
        return adapter_logits / alpha_tilde
    q = objective.q_values(adapter_logits, base_logits, q_form)  # type: ignore[arg-type]
    return objective.combined_logits(q, F.log_softmax(base_logits, -1), alpha_0, alpha_tilde)


@torch.no_grad()
def generate_ids(
    qmodel: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: DecodeConfig = DecodeConfig(),
    policy: Policy = "customized",
) -> torch.Tensor:
    """New token ids, (b, T) → (b, n ≤ max_new_tokens), rows padded after their EOS."""
    device = qmodel.device
    alpha_0 = qmodel.config.alpha_0 if config.alpha_0 is None else config.alpha_0
    alpha_tilde = qmodel.config.alpha_tilde if config.alpha_tilde is None else config.alpha_tilde
    tokenizer = qmodel.tokenizer
    eos = {tokenizer.eos_token_id}
    extra = getattr(qmodel.peft_model.generation_config, "eos_token_id", None)
    eos.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    eos_tensor = torch.tensor(sorted(e for e in eos if e is not None), device=device)
    generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None

    ids, mask = input_ids.to(device), attention_mask.to(device)
    pos = position_ids(mask)  # (b, T)
    passes = _Passes(qmodel, ids.shape[0], policy, alpha_0)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    new_tokens = []
    was_training = qmodel.peft_model.training
    qmodel.peft_model.eval()
    try:
        with autocast(device, choose_mixed_precision(device)):
            adapter_logits, base_logits = passes.step(ids, mask, pos)
            for step in range(config.max_new_tokens):
                logits = customized_logits(adapter_logits, base_logits, qmodel.config.q_form, alpha_0, alpha_tilde)  # (b, V)
                if step < config.min_new_tokens:
                    logits = logits.index_fill(-1, eos_tensor, float("-inf"))
                token = sample_next(logits, temperature=config.temperature, top_p=config.top_p, generator=generator)  # (b,)
                token = token.masked_fill(finished, tokenizer.pad_token_id)
                new_tokens.append(token)
                finished |= torch.isin(token, eos_tensor)
                if bool(finished.all()):
                    break
                mask = F.pad(mask, (0, 1), value=1)  # (b, T+1); finished rows feed padding nobody reads
                pos = pos[:, -1:] + 1  # (b, 1)
                adapter_logits, base_logits = passes.step(token.unsqueeze(1), mask, pos)
    finally:
        qmodel.peft_model.train(was_training)
    return torch.stack(new_tokens, dim=1)  # (b, n)


def generate(
    qmodel: Any,
    prompts: Prompt | Sequence[Prompt],
    config: DecodeConfig = DecodeConfig(),
    policy: Policy = "customized",
    chat: bool = True,
) -> list[str]:
    """Generate a completion per prompt with the customized (or the base) policy."""
    batch = [prompts] if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)) else list(prompts)
    ids, mask = encode_prompts(qmodel.tokenizer, batch, chat)  # type: ignore[arg-type]
    out = generate_ids(qmodel, ids, mask, config, policy)
    return [qmodel.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out.tolist()]
