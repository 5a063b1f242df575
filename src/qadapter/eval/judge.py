"""Preference alignment judged by a reward model: win rate of customized over base responses.

A *judge* is any object with ``score(prompts, responses) -> list[float]`` (higher = better). Two
are provided:

* :class:`RewardModelJudge`: any Hugging Face sequence-classification reward model.
* :class:`BagOfWordsJudge`: a built-in judge trained offline in seconds on the training split, a
  linear Bradley–Terry model over hashed word n-grams of the response. It judges style, not
  relevance (it never reads the prompt), which is what a style preference such as DSP's asks.

Before trusting a judge's verdicts, measure it: :func:`pairwise_accuracy` on held-out pairs of
the preference being customized says how often it ranks the preferred response first.

Both judges are pointwise (each response gets a score on its own), so the order in which two
responses are shown cannot matter and :func:`win_rate` scores every response once.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .. import __version__
from ..atomic import atomic_dir, write_json_atomic
from ..config import read_json
from ..data import Message, PreferenceRecord, Turns
from ..errors import ModelError
from .retention import wilson_interval

PromptLike = str | list[Message]


class Judge(Protocol):
    def score(self, prompts: Sequence[PromptLike], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response); higher means better."""
        ...


def _check_lengths(prompts: Sequence[Any], *responses: Sequence[Any]) -> None:
    if any(len(r) != len(prompts) for r in responses):
        raise ValueError(f"{len(prompts)} prompts but {', '.join(str(len(r)) for r in responses)} responses")


def render_prompt(prompt: PromptLike) -> str:
    """Plain text of a prompt: a string as is, a single user turn as its content, a longer
    conversation as a "Role: content" transcript (so earlier turns stay visible)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def response_text(response: Turns) -> str:
    """A record's response as text: assistant (and later) turns joined by blank lines."""
    return response if isinstance(response, str) else "\n\n".join(m["content"] for m in response)


# ---------------------------------------------------------------------------------------------
# How good is a judge, and how often does it prefer A over B


@dataclass
class JudgeAccuracy:
    """How often a judge scores the preferred response of a held-out pair above the other one.

    Ties count 1/2; ``low``/``high`` is the 95% Wilson interval. 0.5 is chance: a judge whose
    interval reaches 0.5 cannot tell the preference apart on this data.
    """

    accuracy: float
    low: float
    high: float
    n_pairs: int
    ties: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pairwise_accuracy(judge: Judge, records: Sequence[PreferenceRecord]) -> JudgeAccuracy:
    """Held-out pairwise accuracy of ``judge`` on preference records (chosen should score higher)."""
    if not records:
        raise ValueError("pairwise_accuracy needs at least one record")
    prompts = [r.prompt for r in records]
    chosen = judge.score(prompts, [response_text(r.chosen) for r in records])
    rejected = judge.score(prompts, [response_text(r.rejected) for r in records])
    right = sum(c > r for c, r in zip(chosen, rejected))
    ties = sum(c == r for c, r in zip(chosen, rejected))
    n = len(records)
    low, high = wilson_interval(right + ties / 2, n)  # a tie counts 1/2
    return JudgeAccuracy((right + ties / 2) / n, low, high, n, ties)


@dataclass
class WinRate:
    """Responses A against responses B to the same prompts, as a judge sees them.

    ``rate`` = (wins + ties/2) / n: the chance that A's response is judged better than B's on a
    random prompt, a tie counting as half. ``low``/``high``: 95% Wilson interval with wins + ties/2
    as the count of successes; a tie varies less than a coin flip, so this interval is, if
    anything, too wide. ``mean_difference``: mean of score(A) − score(B), in the judge's units.
    """

    wins: int
    ties: int
    losses: int
    n: int
    rate: float
    low: float
    high: float
    mean_difference: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def win_rate(
    judge: Judge,
    prompts: Sequence[PromptLike],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    *,
    tie_margin: float = 0.0,
) -> WinRate:
    """Win rate of ``responses_a`` (e.g. customized) over ``responses_b`` (e.g. base), per prompt.

    A pair whose scores differ by at most ``tie_margin`` is a tie. The judge is pointwise, so each
    response is scored once and presentation order plays no part.
    """
    _check_lengths(prompts, responses_a, responses_b)
    if not prompts:
        raise ValueError("win_rate needs at least one prompt")
    return compare_scores(judge.score(prompts, responses_a), judge.score(prompts, responses_b), tie_margin=tie_margin)


def compare_scores(a: Sequence[float], b: Sequence[float], *, tie_margin: float = 0.0) -> WinRate:
    """Win rate of scores ``a`` over scores ``b`` given to two responses to the same prompts, in order."""
    _check_lengths(a, b)
    if not a:
        raise ValueError("a win rate needs at least one prompt")
    if not all(math.isfinite(s) for s in (*a, *b)):
        raise ValueError("the judge returned a NaN or infinite score")
    diffs = [x - y for x, y in zip(a, b)]
    wins = sum(d > tie_margin for d in diffs)
    losses = sum(d < -tie_margin for d in diffs)
    n = len(diffs)
    ties = n - wins - losses
    won = wins + ties / 2
    low, high = wilson_interval(won, n)
    return WinRate(wins, ties, losses, n, won / n, low, high, sum(diffs) / n)


# ---------------------------------------------------------------------------------------------
# Hugging Face reward models


class RewardModelJudge:
    """A Hugging Face ``AutoModelForSequenceClassification`` reward model as a judge.

    The reward is the single logit, or logit[1] − logit[0] for a two-label head. With a chat
    template the model reads the conversation (prompt messages + an assistant turn); without one,
    "prompt\\n\\nresponse". Over-long inputs lose tokens from the left, since the reward is read
    at the last token.
    """

    def __init__(
        self,
        name_or_path: str,
        device: torch.device | str | None = None,
        batch_size: int = 8,
        max_length: int = 4096,
        precision: str = "no",
    ) -> None:
        """``precision``: the weights' dtype, float32 (``"no"``, the evaluation default), ``bf16`` or ``fp16``."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..hardware import choose_mixed_precision, default_device

        self.device = torch.device(device) if device is not None else default_device()
        dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choose_mixed_precision(self.device, precision)]
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model, info = AutoModelForSequenceClassification.from_pretrained(name_or_path, dtype=dtype, output_loading_info=True)
        except (OSError, ValueError, KeyError) as exc:  # missing files, a config with no classification class
            raise ModelError(f"{name_or_path}: cannot load a sequence-classification reward model ({exc})") from None
        if info["missing_keys"]:  # e.g. a causal LM: its classification head would be random
            raise ModelError(
                f"{name_or_path}: not a reward model, weights missing from the checkpoint: {', '.join(sorted(info['missing_keys']))}"
            )
        if model.config.num_labels not in (1, 2):
            raise ModelError(f"{name_or_path}: a reward model has 1 or 2 output labels, this one has {model.config.num_labels}")
        self.batch_size = batch_size
        text_config = model.config.get_text_config()
        if tokenizer.pad_token_id is None:
            # the model finds the last token by the pad id, so without one each text goes alone, unpadded
            self.batch_size = 1
        elif text_config.pad_token_id is None:
            text_config.pad_token_id = tokenizer.pad_token_id
        tokenizer.truncation_side = "left"
        tokenizer.padding_side = "right"
        self.name = name_or_path
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.model = model.to(self.device).eval()

    def _render(self, prompt: PromptLike, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            return self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        return f"{render_prompt(prompt)}\n\n{response}"

    @torch.no_grad()
    def score(self, prompts: Sequence[PromptLike], responses: Sequence[str]) -> list[float]:
        """The reward of each response to its prompt."""
        _check_lengths(prompts, responses)
        texts = [self._render(p, r) for p, r in zip(prompts, responses)]
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            batch = self.tokenizer(
                chunk,
                add_special_tokens=not templated,  # a chat template writes its own special tokens
                padding=len(chunk) > 1,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            reward = logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]
            scores.extend(reward.cpu().tolist())
        return scores


# ---------------------------------------------------------------------------------------------
# The built-in judge

_TOKEN = re.compile(r"\w+|[^\w\s]")
JUDGE_WEIGHTS = "judge.safetensors"
JUDGE_CONFIG = "judge.json"


def featurize(texts: Sequence[str], n_features: int) -> torch.Tensor:
    """Sparse (len(texts), n_features) rows: hashed word unigram + bigram counts, log1p, L2-normalised.

    Lower-cased words and punctuation marks are the tokens; crc32 hashing is stable across runs
    (Python's ``hash`` is salted per process). Normalising makes a response's length no feature.
    """
    rows, cols, values = [], [], []
    for i, text in enumerate(texts):
        words = _TOKEN.findall(text.lower())
        grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
        counts = Counter(zlib.crc32(g.encode("utf-8")) % n_features for g in grams)
        logs = {j: math.log1p(c) for j, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in logs.values())) or 1.0
        for j, v in sorted(logs.items()):
            rows.append(i)
            cols.append(j)
            values.append(v / norm)
    return torch.sparse_coo_tensor([rows, cols], values, (len(texts), n_features), dtype=torch.float32, check_invariants=True).coalesce()


class BagOfWordsJudge:
    """Linear Bradley–Terry judge over hashed n-grams of the response: score = w · features.

    ``fit`` minimises mean −log σ(score(chosen) − score(rejected)) + ``l2``/2 ‖w‖² with
    full-batch L-BFGS from w = 0. The problem is convex and nothing is random, so the same
    records always give the same judge.
    """

    def __init__(self, n_features: int = 2**18, l2: float = 1e-3, weight: torch.Tensor | None = None) -> None:
        self.n_features = n_features
        self.l2 = l2
        self.weight = torch.zeros(n_features) if weight is None else weight
        self.train_loss: float | None = None
        self.train_pairs = 0

    def fit(self, records: Sequence[PreferenceRecord], max_iter: int = 200) -> BagOfWordsJudge:
        """Train on preference records (the training split); returns self."""
        if not records:
            raise ValueError("BagOfWordsJudge.fit needs at least one record")
        chosen = featurize([response_text(r.chosen) for r in records], self.n_features)
        rejected = featurize([response_text(r.rejected) for r in records], self.n_features)
        diff = (chosen - rejected).coalesce()
        weight = torch.zeros(self.n_features, 1, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe")

        def objective() -> torch.Tensor:
            return F.softplus(-torch.sparse.mm(diff, weight)).mean() + self.l2 / 2 * weight.pow(2).sum()

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        optimizer.step(closure)
        self.weight = weight.detach().squeeze(1)
        with torch.no_grad():
            self.train_loss = float(objective())
        self.train_pairs = len(records)
        return self

    @torch.no_grad()
    def score(self, prompts: Sequence[PromptLike], responses: Sequence[str]) -> list[float]:
        """w · features(response); the prompt is not read."""
        _check_lengths(prompts, responses)
        if not responses:
            return []
        return torch.sparse.mm(featurize(responses, self.n_features), self.weight[:, None]).squeeze(1).tolist()

    def accuracy(self, records: Sequence[PreferenceRecord]) -> JudgeAccuracy:
        """Held-out pairwise accuracy with its 95% Wilson interval (see :func:`pairwise_accuracy`)."""
        return pairwise_accuracy(self, records)

    def save(self, path: str | Path) -> None:
        """A folder with ``judge.safetensors`` (the weights) and ``judge.json``, written atomically."""
        from safetensors.torch import save_file

        meta = {
            "kind": "bag-of-words",
            "n_features": self.n_features,
            "l2": self.l2,
            "train_loss": self.train_loss,
            "train_pairs": self.train_pairs,
            "qadapter_version": __version__,
        }
        with atomic_dir(path) as tmp:
            save_file({"weight": self.weight.contiguous()}, str(tmp / JUDGE_WEIGHTS))
            write_json_atomic(tmp / JUDGE_CONFIG, meta)

    @classmethod
    def load(cls, path: str | Path) -> BagOfWordsJudge:
        """Read a judge written by :meth:`save`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / JUDGE_CONFIG).is_file() or not (folder / JUDGE_WEIGHTS).is_file():
            raise ModelError(f"{folder}: not a saved BagOfWordsJudge ({JUDGE_CONFIG} and {JUDGE_WEIGHTS} expected)")
        meta = read_json(str(folder / JUDGE_CONFIG), "judge config")
        try:
            weight = load_file(str(folder / JUDGE_WEIGHTS))["weight"]
        except (SafetensorError, OSError, KeyError) as exc:
            raise ModelError(f"{folder / JUDGE_WEIGHTS}: not a judge's weights ({exc})") from None
        if meta.get("kind") != "bag-of-words" or weight.shape != (meta.get("n_features"),):
            raise ModelError(f"{folder}: {JUDGE_CONFIG} does not describe {JUDGE_WEIGHTS} (shape {tuple(weight.shape)})")
        judge = cls(meta["n_features"], meta.get("l2", 0.0), weight.float())
        judge.train_loss, judge.train_pairs = meta.get("train_loss"), meta.get("train_pairs", 0)
        return judge
