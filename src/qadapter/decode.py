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


class _TwoPass:
    """The adapted and the base model stepping together, each with its own KV cache."""

    def __init__(self, qmodel: Any, policy: Policy) -> None:
        self.model = qmodel.peft_model
        self.policy = policy
        self.cache: dict[str, Any] = {"adapter": None, "base": None}

    def _forward(self, which: str, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache[which], use_cache=True)
        self.cache[which] = out.past_key_values
        return out.logits[:, -1].float()  # (b, V): only the last position is needed

    def step(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Feed new tokens; return (adapter logits or None, base logits) at the last position."""
        with self.model.disable_adapter():
            base = self._forward("base", ids, mask, pos)
        adapter = None if self.policy == "base" else self._forward("adapter", ids, mask, pos)
        return adapter, base


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
    passes = _TwoPass(qmodel, policy)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    new_tokens = []
    was_training = qmodel.peft_model.training
    qmodel.peft_model.eval()
    try:
        with autocast(device, choose_mixed_precision(device)):
            adapter_logits, base_logits = passes.step(ids, mask, pos)
            for _ in range(config.max_new_tokens):
                if adapter_logits is None:  # the base policy alone
                    logits = base_logits
                else:
                    q = objective.q_values(adapter_logits, base_logits, qmodel.config.q_form)  # (b, V)
                    logits = objective.combined_logits(q, F.log_softmax(base_logits, -1), alpha_0, alpha_tilde)  # (b, V)
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
