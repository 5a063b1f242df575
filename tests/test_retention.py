"""Retention metrics on cases whose answer is known by construction."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from qadapter import objective
from qadapter.config import QAdapterConfig
from qadapter.data import BUNDLED_DATA
from qadapter.eval.benchmarks import CHANCE, LOADERS, ChoiceItem, final_number, load_benchmark
from qadapter.eval.retention import (
    PolicySpec,
    bits_per_byte,
    choice_accuracy,
    choice_logliks,
    choice_picks,
    kl_to_base,
    mcnemar_exact,
    mean_difference,
    minimum_detectable_effect,
    paired_difference,
    scaled_adapter,
    wilson_interval,
)
from qadapter.model import QAdapterModel, load_base
from qadapter.objective_hidden import kl_from_hidden


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
        ref = objective.kl_from_logits(objective.combined_logits(q, base, 0.7, 1.3), base)
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


def test_exact_ties_are_broken_at_random_by_item_id():
    """All options tie: the pick is uniform over them (right on about 1/k of the items whatever gold is,
    not on every item whose gold is listed first), and the same for every call, i.e. every policy."""
    k, n = 4, 2000
    items = [ChoiceItem(f"tie/{i}", "q", (" a", " b", " c", " d"), 0) for i in range(n)]
    scores = [[-1.5] * k] * n
    acc, acc_norm = choice_accuracy(items, scores)
    assert 0.2 < sum(acc) / n < 0.3 and 0.2 < sum(acc_norm) / n < 0.3
    picks, _ = choice_picks(items, scores)
    assert {p for p in picks} == set(range(k)) and choice_picks(items, scores)[0] == picks
    # only the tied options are candidates: option 3 is never picked when it scores lower
    lower = choice_picks(items, [[-1.0, -1.0, -1.0, -2.0]] * n)[0]
    assert set(lower) == {0, 1, 2}


def test_changed_counts_picks_not_correctness():
    """Wrong under both but with another wrong option: the answer changed, the correctness did not."""
    method, base = [0, 0, 1, 0], [0, 0, 1, 0]
    diff = paired_difference(method, base, method_picks=[1, 2, 0, 3], base_picks=[2, 2, 0, 1])
    assert diff.changed == 0.5 and diff.mean == 0.0
    assert paired_difference(method, base).changed == 0.0  # without picks: correctness only (a lower bound)
    with pytest.raises(ValueError, match="both or of neither"):
        paired_difference(method, base, method_picks=[0, 0, 0, 0])
    with pytest.raises(ValueError, match="1/0"):
        paired_difference([0.5], [1])


def test_mcnemar_exact_and_minimum_detectable_effect_by_hand():
    """b = 8 right only under the method, c = 2 only under the base: p = 2·(C(10,0)+C(10,1)+C(10,2))/2¹⁰
    = 112/1024; MDE at n = 100 with 10 discordant = (1.959964 + 0.841621)·√(0.1/100)."""
    assert mcnemar_exact(8, 2) == 112 / 1024 == mcnemar_exact(2, 8)
    assert mcnemar_exact(10, 0) == 2 / 1024
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(1100, 900) == pytest.approx(8.457089535503e-06, rel=1e-10)  # scipy.stats.binomtest(1100, 2000).pvalue
    assert minimum_detectable_effect(10, 100) == pytest.approx(2.801585 * math.sqrt(0.001), rel=1e-6)
    assert minimum_detectable_effect(0, 100) == pytest.approx(2.801585 * 0.01, rel=1e-6)  # p_disc floored at 1/n
    method = [1] * 8 + [0] * 2 + [1] * 45 + [0] * 45
    base = [0] * 8 + [1] * 2 + [1] * 45 + [0] * 45
    diff = paired_difference(method, base)
    assert diff.mcnemar_p == 112 / 1024 and diff.mde == pytest.approx(0.0885939, abs=1e-6) and diff.changed == 0.1


def test_mean_difference_of_floats():
    d = mean_difference([1.0, 2.0, 3.5], [0.5, 1.0, 3.0])
    assert d.mean == pytest.approx(2 / 3) and d.n == 3 and d.low < d.mean < d.high
    with pytest.raises(ValueError):
        mean_difference([], [])


def _record_forwards(qm):
    """(pass, rows) of every forward: 'base' when PEFT's adapter is disabled, else 'adapter'."""
    calls = []
    layer = next(m for n, m in qm.peft_model.named_modules() if n.endswith("q_proj") and hasattr(m, "disable_adapters"))
    handle = layer.register_forward_hook(lambda module, args, _: calls.append(("base" if module.disable_adapters else "adapter", args[0].shape[0])))
    return calls, handle


@pytest.mark.parametrize("hidden_path", [True, False])
def test_adapted_model_policies_skip_the_base_pass(qmodel, hidden_path):
    """Residual Q at α₀ = α̃ = 1 is the adapted model: only the adapter pass runs, with the same
    log-likelihoods as when both run; the base alone runs only the base pass; any other (α₀, α̃) both."""
    qmodel.hidden_path = hidden_path
    _perturb(qmodel)
    adapted = [PolicySpec("sft", 1.0, 1.0), PolicySpec("own", None, None)]  # the config's own dial is (1, 1)
    calls, handle = _record_forwards(qmodel)
    one = choice_logliks(qmodel, ITEMS, adapted, batch_size=2)
    assert {name for name, _ in calls} == {"adapter"}
    calls.clear()
    both = choice_logliks(qmodel, ITEMS, [PolicySpec("base", base=True), *adapted], batch_size=2)
    assert {name for name, _ in calls} == {"base", "adapter"}
    calls.clear()
    base = choice_logliks(qmodel, ITEMS, [PolicySpec("base", base=True)], batch_size=2)
    assert {name for name, _ in calls} == {"base"}
    calls.clear()
    choice_logliks(qmodel, ITEMS, [PolicySpec("dial", 2.0, 2.0)], batch_size=2)
    assert {name for name, _ in calls} == {"base", "adapter"}
    handle.remove()
    for name in ("sft", "own"):
        for a, b in zip(one[name], both[name]):
            assert a == pytest.approx(b, abs=1e-5)
    for a, b in zip(base["base"], both["base"]):
        assert a == pytest.approx(b, abs=1e-5)
    assert one["sft"] != base["base"]


def test_raw_q_at_unit_alphas_still_needs_the_base(tiny_model_dir):
    """Raw Q at α₀ = α̃ = 1 is adapted logits + log π₁, not the adapted model: both passes run."""
    qm = QAdapterModel.create(load_base(str(tiny_model_dir), device="cpu"), QAdapterConfig(q_form="raw", lora_dropout=0.0))
    calls, handle = _record_forwards(qm)
    choice_logliks(qm, ITEMS, [PolicySpec("q", 1.0, 1.0)], batch_size=8)
    handle.remove()
    assert {name for name, _ in calls} == {"base", "adapter"}


SHARED_ITEMS = [
    ChoiceItem("s/0", "tell me about the big red cat and the small blue dog", (" good", " very bad indeed", " red"), 0),
    ChoiceItem("s/1", "what is it", (" big dog", " small", " it is the cat on the mat", " no"), 1),
    ChoiceItem("s/2", "why", (" so", " because the dog ran fast"), 0),
]


@pytest.mark.parametrize("hidden_path", [True, False])
def test_shared_contexts_equal_scoring_each_option_whole(qmodel, hidden_path):
    """Each context runs once per pass (one row per item, then one per option, reusing its KV cache),
    and every policy's log-likelihoods equal those of each context + option scored as one sequence,
    to float32 tolerance — contexts and options of different lengths, so padding on both sides."""
    qmodel.hidden_path = hidden_path
    _perturb(qmodel)
    policies = [PolicySpec("base", base=True), PolicySpec("q", 0.5, 1.5), PolicySpec("adapted", 1.0, 1.0)]
    calls, handle = _record_forwards(qmodel)
    shared = choice_logliks(qmodel, SHARED_ITEMS, policies, batch_size=16)
    handle.remove()
    assert calls == [("base", 3), ("base", 9), ("adapter", 3), ("adapter", 9)]
    tok = qmodel.tokenizer
    for i, item in enumerate(SHARED_ITEMS):
        ctx = tok(item.context, add_special_tokens=False)["input_ids"]
        for j, choice in enumerate(item.choices):
            cont = tok(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            completion = torch.tensor([[0] * len(ctx) + [1] * len(cont)])
            with torch.no_grad():
                outputs = qmodel.run_passes(ids, torch.ones_like(ids))
                for policy in policies:
                    terms = outputs.terms(completion, policy.dial)
                    whole = ((terms.base_logp if policy.base else terms.policy_logp) * terms.action_mask).sum().item()
                    assert shared[policy.name][i][j] == pytest.approx(whole, abs=2e-5), (policy.name, i, j)


def _direct_bits(qm, prompt, response, logits_of):
    tok = qm.tokenizer
    ctx, cont = tok(prompt, add_special_tokens=False)["input_ids"], tok(response, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(logits_of(ids, torch.ones_like(ids)).float(), -1)[0]
    nats = -sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
    return nats / math.log(2) / len(response.encode("utf-8"))


TEXTS = [("tell me about the cat", " the cat sat on the mat"), ("why", " so very good"), ("hello there", " yes, the big dog ran")]


def test_bits_per_byte_matches_direct_computation(qmodel):
    """Base: −Σ log₂ softmax(base logits)[response tokens] / UTF-8 bytes, per text; the mean is over
    texts and 'pooled' is Σ bits / Σ bytes. The adapted model (α₀ = α̃ = 1) likewise from its own logits."""
    _perturb(qmodel)
    policies = [PolicySpec("base", base=True), PolicySpec("sft", 1.0, 1.0), PolicySpec("q", 0.5, 0.5)]
    bpb = bits_per_byte(qmodel, TEXTS, policies, batch_size=2)
    direct = [_direct_bits(qmodel, p, r, qmodel.base_logits) for p, r in TEXTS]
    assert bpb["base"]["per_text"] == pytest.approx(direct, abs=1e-5)
    assert bpb["base"]["mean"] == pytest.approx(sum(direct) / 3, abs=1e-5)
    sizes = [len(r.encode()) for _, r in TEXTS]
    assert bpb["base"]["pooled"] == pytest.approx(sum(b * s for b, s in zip(direct, sizes)) / sum(sizes), abs=1e-5)
    adapted = [_direct_bits(qmodel, p, r, qmodel.adapter_logits) for p, r in TEXTS]
    assert bpb["sft"]["per_text"] == pytest.approx(adapted, abs=1e-5)
    diff = mean_difference(bpb["q"]["per_text"], bpb["base"]["per_text"])
    assert diff.mean == pytest.approx(bpb["q"]["mean"] - bpb["base"]["mean"]) and diff.mean != 0
    with pytest.raises(ValueError):
        bits_per_byte(qmodel, [], policies)


def test_scaled_adapter_interpolates_the_lora_delta(qmodel):
    """λ = 0 is the base, λ = 1 the adapter, λ = ½ in between (the logits are not linear in λ, the
    network is not); the weight delta itself is exactly linear in λ; the scales come back on exit."""
    _perturb(qmodel, scale=0.1)
    ids = torch.tensor([qmodel.tokenizer("tell me about the big red dog")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        base, full = qmodel.base_logits(ids, mask), qmodel.adapter_logits(ids, mask)
        with scaled_adapter(qmodel, 0.0):
            assert_close(qmodel.adapter_logits(ids, mask), base, rtol=0, atol=1e-6)
        with scaled_adapter(qmodel, 1.0):
            assert_close(qmodel.adapter_logits(ids, mask), full, rtol=0, atol=0)
        with scaled_adapter(qmodel, 0.5):
            half = qmodel.adapter_logits(ids, mask)
        span = (full - base).norm()
        assert 0 < (half - base).norm() < span and 0 < (full - half).norm() < span
    layers = [m for n, m in qmodel.peft_model.named_modules() if hasattr(m, "get_delta_weight") and n.endswith("q_proj")]
    assert layers
    for layer in layers:
        delta = layer.get_delta_weight(qmodel.adapter_name)
        with scaled_adapter(qmodel, 0.5):
            assert_close(layer.get_delta_weight(qmodel.adapter_name), 0.5 * delta, rtol=1e-6, atol=1e-7)
        with scaled_adapter(qmodel, 0.0):
            assert layer.get_delta_weight(qmodel.adapter_name).abs().max() == 0
        assert_close(layer.get_delta_weight(qmodel.adapter_name), delta, rtol=0, atol=0)
    with pytest.raises(ValueError, match="λ"):
        with scaled_adapter(qmodel, 1.5):
            pass


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
