"""Replay data for the ``replay`` peer: the base model's own responses to general prompts.

The reference code (``make_replay_data.py``) generates a response with the base model
for each prompt and writes a copy of the record with ``chosen`` replaced by that response, keeping
its ``rejected`` one. Here the prompts come from a general distribution instead of the task's own
(default: the single-turn prompts of HH-RLHF helpful-base test, see :func:`default_replay_prompts`),
and the construction is the same:

* replay SFT row: (x, y₁) with y₁ ~ π₁(·|x). The NLL of base samples is a Monte-Carlo estimate of
  the cross-entropy H(π₁, π) on the general distribution, i.e. KL(π₁ ‖ π) up to a constant, whose
  minimiser is π = π₁ there: the row pulls the policy back to the base exactly where the task data
  says nothing. Hence sampling at temperature 1 by default; greedy decoding (the reference code's
  choice) replays π₁'s mode, a sharpened target that lowers entropy on general prompts.
* replay DPO row: (x, chosen = y₁, rejected = the reply human labellers rejected for x). DPO's
  gradient raises log π(y₁|x)/π₁(y₁|x) — the same anchor to the base's own behaviour, kept inside
  DPOTrainer's loss and its β-KL to π₁ rather than added as a second loss — against a response
  that is dispreferred for x under the general preference. The label means "keep the base's
  behaviour here", not "the base's answer is better". The alternatives are worse: two base samples
  as a pair carry an arbitrary label (one order) or cancel (both orders: no gradient at π = π₁),
  and an NLL term on y₁ would mean changing TRL's loss; this keeps the peer a stock ``DPOTrainer``
  run. Passing the training records as ``replay_prompts`` with ``temperature=0`` gives the
  reference code's own construction (its prompts, its greedy decoding).

Training on these rows is :mod:`qadapter.eval.baselines`' job; this module only builds and caches them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DecodeConfig, QAdapterConfig
from ..data import Message, PreferenceRecord, Turns, data_file, read_records
from ..errors import ConfigError, DataError

DEFAULT_REPLAY_SOURCE = "hh-rlhf/helpful-base/test.jsonl.gz"  # relative to the data folder (shipped with the package)
ReplayPrompt = PreferenceRecord | str | list[Message]


@dataclass(frozen=True)
class ReplayRecord:
    """A general prompt, the base model's response to it, and (for DPO) a dispreferred reply."""

    prompt: Turns
    response: str
    rejected: str | None = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    def _turn(self, text: str) -> Turns:
        return [{"role": "assistant", "content": text}] if self.conversational else text

    def sft_row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "completion": self._turn(self.response)}

    def dpo_row(self) -> dict[str, Any]:
        if self.rejected is None:
            raise DataError(f"replay prompt {_short(self.prompt)} has no rejected reply: DPO replay needs preference records as prompts")
        return {"prompt": self.prompt, "chosen": self._turn(self.response), "rejected": self._turn(self.rejected)}


def _short(prompt: Turns) -> str:
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return repr(text[:60] + ("…" if len(text) > 60 else ""))


def default_replay_prompts(data_dir: str | Path, exclude: Iterable[PreferenceRecord] = ()) -> list[PreferenceRecord]:
    """General prompts for replay: the single-turn records of HH-RLHF helpful-base test (698).

    Why these and not DSP queries outside the training split: with the usual split the only such
    queries are the held-out evaluation prompts (replaying them would leak evaluation prompts into
    training), and they are the task's distribution, not the original one. HH helpful-base holds
    general assistant requests, disjoint from DSP, and each comes with a reply its labellers
    rejected, which DPO replay pairs with the base's response. Prompts of ``exclude`` (the training
    and held-out records) are left out, so HH data trained on is never replayed.
    """
    path = data_file(data_dir, DEFAULT_REPLAY_SOURCE)
    excluded = {r.prompt_key for r in exclude}
    seen: set[str] = set()
    pool = []
    for record in read_records(path, skip_invalid=True).records:
        key = record.prompt_key
        if len(record.prompt) == 1 and key not in excluded and key not in seen:
            seen.add(key)
            pool.append(record)
    return pool


def _normalize(prompt: ReplayPrompt, chat: bool) -> tuple[Turns, str | None]:
    """(prompt, rejected reply or None); a string becomes a user turn for chat models."""
    if isinstance(prompt, PreferenceRecord):
        rejected = prompt.rejected if isinstance(prompt.rejected, str) else prompt.rejected[0]["content"]
        return prompt.prompt, rejected
    if isinstance(prompt, str):
        return ([{"role": "user", "content": prompt}] if chat else prompt), None
    return list(prompt), None


def _read_cache(path: Path, pool: list[tuple[Turns, str | None]]) -> list[str]:
    """Cached responses: a prefix of the pool, in pool order (nothing if the file does not match)."""
    if not path.is_file():
        return []
    responses = []
    try:
        with open(path, encoding="utf-8") as handle:
            for i, line in enumerate(handle):
                row = json.loads(line)
                if i >= len(pool) or row["prompt"] != pool[i][0]:
                    return []
                responses.append(row["response"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return []
    return responses


def _write_cache(path: Path, pool: list[tuple[Turns, str | None]], responses: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for (prompt, rejected), response in zip(pool, responses):
                handle.write(json.dumps({"prompt": prompt, "response": response, "rejected": rejected}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replay_records(
    base: Any,
    prompts: Sequence[ReplayPrompt],
    n: int,
    max_new_tokens: int = 128,
    seed: int = 0,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    target_modules: list[str] | str | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> list[ReplayRecord]:
    """The base model's responses to the first prompts of ``prompts``, ``n`` usable ones.

    ``base`` is a :class:`~qadapter.model.LoadedBase`; ``prompts`` are preference records (their
    prompt, and their rejected reply for DPO), strings or message lists, each distinct prompt used
    once. Responses come from :func:`qadapter.decode.generate` with the base policy, ``batch_size``
    prompts at a time, batch ``k`` sampled with seed ``seed + k`` (``temperature=0``: greedy). A
    response is usable if it is
    not empty and differs from the prompt's rejected reply. Generated responses are cached in
    ``cache_dir/replay-<key>.jsonl`` (key: base, prompts, decoding settings), a prefix of the prompt
    list rewritten atomically after every batch, so a rerun, or an interrupted run, generates only
    what is missing and a larger ``n`` extends the same list. ``target_modules``: where the
    temporary zero LoRA that decoding needs goes (default q_proj, v_proj); it is removed afterwards.
    """
    if n < 0:
        raise ConfigError(f"the number of replay records must be >= 0, got {n}")
    decode_settings = DecodeConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)  # validates
    if n == 0:
        return []
    chat = bool(getattr(base.tokenizer, "chat_template", None))
    pool, seen = [], set()
    for item in prompts:  # each prompt once, with its first record's rejected reply (as the reference code)
        prompt, rejected = _normalize(item, chat)
        text = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
        if text not in seen:
            seen.add(text)
            pool.append((prompt, rejected))
    identity = base.identity
    key_data = {
        "base": [identity.name, identity.revision, identity.fingerprint, identity.chat_template_sha256],
        "prompts": [p for p, _ in pool],
        "decode": [max_new_tokens, temperature, top_p, seed, batch_size],
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"replay-{key}.jsonl" if cache_dir is not None else None
    responses = _read_cache(cache, pool) if cache is not None else []

    def usable(i: int) -> bool:
        return bool(responses[i].strip()) and responses[i] != pool[i][1]

    count = sum(usable(i) for i in range(len(responses)))
    if count < n and len(responses) < len(pool):
        from ..decode import generate

        log(f"replay: generating base responses for {len(pool) - len(responses)} prompts at most ({len(responses)} cached)")
        with _base_policy(base, target_modules) as qmodel:
            while count < n and len(responses) < len(pool):
                start = len(responses)
                batch = [p for p, _ in pool[start : start + batch_size]]
                settings = DecodeConfig(**{**vars(decode_settings), "seed": seed + start // batch_size})
                responses.extend(generate(qmodel, batch, settings, policy="base"))  # type: ignore[arg-type]
                count += sum(usable(i) for i in range(start, len(responses)))
                if cache is not None:
                    _write_cache(cache, pool, responses)
    picked = [i for i in range(len(responses)) if usable(i)][:n]
    if len(picked) < n:
        raise DataError(
            f"only {len(picked)} usable replay responses from {len(pool)} replay prompts, {n} needed: "
            "pass more replay prompts or a smaller replay fraction"
        )
    return [ReplayRecord(pool[i][0], responses[i], pool[i][1]) for i in picked]


@contextmanager
def _base_policy(base: Any, target_modules: list[str] | str | None = None) -> Iterator[Any]:
    """A :class:`QAdapterModel` view of ``base`` for :func:`qadapter.decode.generate`, which runs the
    base rows with the adapter off; the temporary (zero) LoRA is removed on exit, leaving
    ``base.model`` as it was."""
    from ..model import QAdapterModel

    qmodel = QAdapterModel.create(base, QAdapterConfig(**({"target_modules": target_modules} if target_modules else {})))
    try:
        yield qmodel
    finally:
        qmodel.peft_model.unload()


def replay_count(n_task: int, fraction: float) -> int:
    """Replay rows that make up ``fraction`` of n_task + replay rows."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"replay_fraction must be in (0, 1), got {fraction}")
    return round(fraction * n_task / (1.0 - fraction))
