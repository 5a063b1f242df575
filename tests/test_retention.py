"""Retention metrics on cases whose answer is known by construction."""

from __future__ import annotations


import pytest
import torch
from torch.testing import assert_close

from qadapter import objective
from qadapter.config import QAdapterConfig
from qadapter.data import BUNDLED_DATA
from qadapter.eval.benchmarks import CHANCE, LOADERS, ChoiceItem, final_number, load_benchmark
from qadapter.eval.retention import PolicySpec, choice_accuracy, choice_logliks, kl_to_base, paired_difference, wilson_interval
from qadapter.model import QAdapterModel, load_base
from qadapter.vocab import kl_from_hidden



@pytest.fixture()
def qmodel(tiny_model_dir):
    return QAdapterModel.create(load_base(str(tiny_model_dir), device="cpu"), QAdapterConfig(lora_dropout=0.0))


def _perturb(qm, scale=0.5):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in qm.peft_model.named_parameters():
            if "lora_" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


ITEMS = [
    ChoiceItem("t/0", "tell me about the cat", (" good", " bad", " red"), 0),
    ChoiceItem("t/1", "what is the dog", (" big dog", " small"), 1),
]


def test_always_first_option_scores_fraction_of_gold_zero():
    """A 'model' that always prefers option A is right exactly on the items whose answer is A."""
    items = [ChoiceItem(f"x/{i}", "q", (" a", " b", " c"), gold) for i, gold in enumerate([0, 1, 0, 2, 0])]
    acc, acc_norm = choice_accuracy(items, [[0.0, -1.0, -2.0]] * 5)
    assert acc == [1, 0, 1, 0, 1] and acc_norm == acc


def test_acc_norm_divides_by_characters():
    """−4 over 4 characters beats −3 over 2 characters per character, though not in total."""
    items = [ChoiceItem("x", "q", (" abc", " a"), 0)]
    acc, acc_norm = choice_accuracy(items, [[-4.0, -3.0]])
    assert acc == [0] and acc_norm == [1]


def test_base_logliks_match_direct_computation(qmodel):
    """The base policy's choice log-likelihood equals Σ log softmax(base logits) over the choice tokens."""
    _perturb(qmodel)
    scores = choice_logliks(qmodel, ITEMS, [PolicySpec("base", base=True), PolicySpec("q", 0.5, 1.0)], batch_size=3)
    tok = qmodel.tokenizer
    ctx = tok(ITEMS[0].context)["input_ids"]
    cont = tok(ITEMS[0].choices[1], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(qmodel.base_logits(ids, torch.ones_like(ids)), -1)[0]
    expected = sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
    assert abs(scores["base"][0][1] - expected) < 1e-4
    assert scores["q"][0][1] != pytest.approx(expected, abs=1e-3)  # the perturbed adapter changes the policy


def test_fresh_adapter_at_unit_alphas_is_the_base(qmodel):
    """Residual Q = 0 with α₀ = α̃ = 1: every customized log-likelihood equals the base's, and KL is 0."""
    scores = choice_logliks(qmodel, ITEMS, [PolicySpec("base", base=True), PolicySpec("q", 1.0, 1.0)])
    for a, b in zip(scores["base"], scores["q"]):
        assert a == pytest.approx(b, abs=1e-4)
    kl = kl_to_base(qmodel, [("hello there", " yes the cat sat on the mat")], [PolicySpec("q", 1.0, 1.0)])
    assert abs(kl["q"]) < 1e-5


def test_kl_grows_when_the_policy_moves(qmodel):
    """A perturbed adapter has positive KL to the base, larger at a smaller α (a stronger tilt)."""
    _perturb(qmodel)
    kl = kl_to_base(qmodel, [("tell me", " the big red dog ran fast"), ("why", " so good")], [PolicySpec("weak", 4.0, 4.0), PolicySpec("strong", 0.5, 0.5)])
    assert 0 < kl["weak"] < kl["strong"]


def test_kl_hidden_path_matches_reference():
    """kl_from_hidden equals KL(softmax(combined logits) ‖ softmax(base logits)) on explicit logits."""
    g = torch.Generator().manual_seed(0)
    h_a, h_b, w = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(30, 8, generator=g)
    for q_form in ("residual", "raw"):
        fast = kl_from_hidden(h_a, h_b, w, q_form=q_form, alpha_0=0.7, alpha_tilde=1.3, chunk=4)
        q = objective.q_values(h_a @ w.T, h_b @ w.T, q_form)
        base = torch.log_softmax(h_b @ w.T, -1)
        ref = objective.kl_to_base(objective.combined_logits(q, base, 0.7, 1.3), base)
        assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_paired_difference_and_wilson():
    """Hand-worked: d = (0, 1, 0, 0) → mean ¼, half of the items unchanged…; Wilson(0, 10) starts at 0."""
    diff = paired_difference([1, 1, 0, 1], [1, 0, 0, 1])
    assert diff.mean == 0.25 and diff.changed == 0.25 and diff.n == 4
    assert diff.low < 0.25 < diff.high
    same = paired_difference([1, 0, 1], [1, 0, 1])
    assert same.mean == same.low == same.high == 0.0
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.2 < high < 0.35
    with pytest.raises(ValueError):
        paired_difference([1], [1, 0])


def test_final_number():
    """GSM8K answers: the last number, commas removed, a trailing .0 dropped."""
    assert final_number("so 3 + 4 = 7. The answer is 1,234") == "1234"
    assert final_number("#### 18") == "18"
    assert final_number("It costs 5.0 dollars") == "5"
    assert final_number("no digits") is None


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_benchmarks_load_a_fixed_sample(name):
    """Each local benchmark loads; the seeded sample is stable and the gold index is in range."""
    first = load_benchmark(name, BUNDLED_DATA, n=5, seed=0)
    assert first == load_benchmark(name, BUNDLED_DATA, n=5, seed=0) and len(first) == 5
    assert name in CHANCE
    for item in first:
        if isinstance(item, ChoiceItem):
            assert 0 <= item.gold < len(item.choices) and all(c.startswith(" ") for c in item.choices)
        else:
            assert final_number(item.answer) is not None
