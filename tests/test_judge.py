"""Judges and win rates on cases whose right answer is known by construction."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import WORDS, build_tokenizer
from qadapter.data import PreferenceRecord
from qadapter.errors import ModelError
from qadapter.eval.judge import BagOfWordsJudge, RewardModelJudge, pairwise_accuracy, render_prompt, win_rate
from qadapter.eval.retention import wilson_interval

FILLER = [w for w in WORDS if w not in ("good", "bad")]


def marker_pairs(n: int, seed: int) -> list[PreferenceRecord]:
    """The chosen response holds the marker word 'good'; the rejected one, other random words, does not."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = [{"role": "user", "content": " ".join(rng.choices(FILLER, k=4))}]
        body = rng.choices(FILLER, k=rng.randint(3, 8))
        body.insert(rng.randrange(len(body) + 1), "good")
        rejected = rng.choices(FILLER, k=rng.randint(4, 9))
        records.append(PreferenceRecord(prompt, " ".join(body), " ".join(rejected)))
    return records


class MarkerJudge:
    """Scores a response by how often it says 'good'."""

    def score(self, prompts, responses):
        assert len(prompts) == len(responses)
        return [float(r.split().count("good")) for r in responses]


@pytest.fixture(scope="module")
def bow_judge() -> BagOfWordsJudge:
    return BagOfWordsJudge(n_features=2**16).fit(marker_pairs(200, seed=0))


def test_bag_of_words_judge_learns_the_marker(bow_judge):
    result = bow_judge.accuracy(marker_pairs(100, seed=1))
    assert result.accuracy > 0.95 and result.n_pairs == 100
    assert result.low <= result.accuracy <= result.high
    marked, plain = bow_judge.score(["tell me", "tell me"], ["the cat sat good on the mat", "the cat sat on the mat"])
    assert marked > plain


def test_bag_of_words_judge_is_deterministic(bow_judge):
    again = BagOfWordsJudge(n_features=2**16).fit(marker_pairs(200, seed=0))
    assert torch.equal(again.weight, bow_judge.weight)


def test_bag_of_words_scores_do_not_depend_on_the_batch():
    # the same text featurizes the same way in any batch (stable hashing, row-wise normalisation)
    judge = BagOfWordsJudge(n_features=2**10, weight=torch.linspace(-1, 1, 2**10))
    alone = judge.score(["p"], ["big red dog"])
    batched = judge.score(["p", "q"], ["small cat", "big red dog"])
    assert alone[0] == pytest.approx(batched[1])


def test_win_rate_counts_known_outcomes():
    prompts = [f"prompt {i}" for i in range(5)]
    a = ["good good", "good", "good", "good yes", "no"]  # win, win, tie, win, loss
    b = ["good", "no", "good", "no", "good"]
    result = win_rate(MarkerJudge(), prompts, a, b)
    assert (result.wins, result.ties, result.losses, result.n) == (3, 1, 1, 5)
    assert result.rate == pytest.approx(0.7)
    assert result.low < 0.7 < result.high
    assert (result.low, result.high) == pytest.approx(wilson_interval(3.5, 5))
    assert result.mean_difference == pytest.approx((1 + 1 + 0 + 1 - 1) / 5)
    # a margin of one 'good' turns every decided prompt into a tie
    wide = win_rate(MarkerJudge(), prompts, a, b, tie_margin=1.0)
    assert (wide.wins, wide.ties, wide.losses, wide.rate) == (0, 5, 0, 0.5)


def test_win_rate_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        win_rate(MarkerJudge(), ["p", "q"], ["good"], ["bad"])


def test_pairwise_accuracy_counts_ties_as_half():
    records = [
        PreferenceRecord("p", "good", "no"),  # right
        PreferenceRecord("p", "yes", "no"),  # tie
        PreferenceRecord("p", "no", "good"),  # wrong
        PreferenceRecord("p", [{"role": "assistant", "content": "good good"}], [{"role": "assistant", "content": "good"}]),
    ]
    result = pairwise_accuracy(MarkerJudge(), records)
    assert (result.accuracy, result.ties, result.n_pairs) == (pytest.approx(2.5 / 4), 1, 4)


def test_render_prompt():
    assert render_prompt("hi") == "hi"
    assert render_prompt([{"role": "user", "content": "hi"}]) == "hi"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "why"}]
    assert render_prompt(turns) == "User: hi\n\nAssistant: yo\n\nUser: why"


def test_save_load_round_trip(bow_judge, tmp_path):
    responses = ["the cat sat good", "why is the dog so slow", "good good good", "!"]
    bow_judge.save(tmp_path / "judge")
    bow_judge.save(tmp_path / "judge")  # overwriting an existing judge is atomic too
    loaded = BagOfWordsJudge.load(tmp_path / "judge")
    assert loaded.score(["p"] * 4, responses) == bow_judge.score(["p"] * 4, responses)
    assert (loaded.n_features, loaded.l2, loaded.train_pairs) == (bow_judge.n_features, bow_judge.l2, 200)
    with pytest.raises(ModelError):
        BagOfWordsJudge.load(tmp_path / "missing")


def _reward_model_dir(tmp_path, num_labels: int):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path / f"rm-{num_labels}"
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


PROMPTS = ["tell me about the cat", [{"role": "user", "content": "why is the dog slow"}], "hello there"]
RESPONSES = ["the cat sat on the mat", "it is big", "yes hello to you there and good"]


def test_reward_model_judge_scores_finite_and_deterministic(tmp_path):
    folder = _reward_model_dir(tmp_path, num_labels=1)
    judge = RewardModelJudge(str(folder), device="cpu", batch_size=2)
    scores = judge.score(PROMPTS, RESPONSES)
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores)
    assert judge.score(PROMPTS, RESPONSES) == scores
    # padding must not move the reward: scoring one at a time gives the same numbers
    alone = RewardModelJudge(str(folder), device="cpu", batch_size=1).score(PROMPTS, RESPONSES)
    assert alone == pytest.approx(scores, abs=1e-5)
    # a plain-string prompt is the same conversation as a single user turn
    as_messages = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in PROMPTS]
    assert judge.score(as_messages, RESPONSES) == pytest.approx(scores, abs=1e-6)


def test_reward_model_judge_two_labels_is_logit_difference(tmp_path):
    folder = _reward_model_dir(tmp_path, num_labels=2)
    judge = RewardModelJudge(str(folder), device="cpu")
    (score,) = judge.score(["hello there"], ["yes good"])
    conversation = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "yes good"}]
    text = judge.tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = judge.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = judge.model(input_ids=ids).logits[0]
    assert score == pytest.approx(float(logits[1] - logits[0]), abs=1e-5)


def test_reward_model_judge_errors_name_the_model(tmp_path, tiny_model_dir):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="no-such-model"):
        RewardModelJudge(str(missing), device="cpu")
    # a causal LM has no trained classification head: refused rather than judged at random
    with pytest.raises(ModelError, match="not a reward model"):
        RewardModelJudge(str(tiny_model_dir), device="cpu")
