"""Composing adapters: several Q-Adapters on one base decode with (Σ_i w_i·Q_i + α₀ log π₁)/α̃, one forward per step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from qadapter.config import DecodeConfig, Dial, QAdapterConfig
from qadapter.data import read_records
from qadapter.decode import BASE, DecodeBatch, customized_logits, encode_prompts, eos_ids, generate_ids, mixture, token_rows
from qadapter.errors import ConfigError, ModelError
from qadapter.model import QAdapterModel
from qadapter.training import train

from conftest import engine_rows, marker_records, random_adapter, reference_generate

PROMPTS = ["tell me about the cat", "why is the dog so big and red"]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    """'a' residual, 'b' raw: each adapter's Q keeps its own form."""
    root = tmp_path_factory.mktemp("compose")
    return {"a": random_adapter(tiny_model_dir, root / "a", "residual", 1), "b": random_adapter(tiny_model_dir, root / "b", "raw", 2)}


@pytest.fixture(scope="module")
def composed(adapter_dirs):
    return QAdapterModel.from_pretrained(adapter_dirs, device="cpu")


def _separate_passes(qm, ids, mask) -> dict[str, torch.Tensor]:
    """Last-position logits of each adapter alone and of the base, each from its own full forward, no cache."""
    out = {}
    with torch.no_grad():
        for name in qm.adapters:
            qm.peft_model.set_adapter(name)
            out[name] = qm.adapter_logits(ids, mask)[:, -1].float()
        qm.peft_model.set_adapter(next(iter(qm.adapters)))
        out[BASE] = qm.base_logits(ids, mask)[:, -1].float()
    return out


def _formula(passes, weights, alpha_0, alpha_tilde):
    """(w_a·(a − base) + w_b·b + α₀ log softmax(base))/α̃ for 'a' residual and 'b' raw, written out."""
    q = weights["a"] * (passes["a"] - passes[BASE]) + weights["b"] * passes["b"]
    return (q + alpha_0 * F.log_softmax(passes[BASE], -1)) / alpha_tilde


def test_composition_loads_both_adapters_on_one_base(composed):
    """Both adapters sit on one base model, in load order; the first sets the default dial."""
    assert list(composed.adapters) == ["a", "b"]
    assert [c.q_form for c in composed.adapters.values()] == ["residual", "raw"]
    assert set(composed.peft_model.peft_config) == {"a", "b"}


@pytest.mark.parametrize("weights,alpha_0,alpha_tilde", [({"a": 1.0, "b": 0.5}, 0.7, 1.3), ({"a": 2.0, "b": -0.5}, 1.0, 1.0)])
def test_composed_logits_equal_formula_from_separate_passes(composed, weights, alpha_0, alpha_tilde, float32):
    """One mixed-batch forward ([a rows; b rows; base rows], one cache) gives the policy of the formula computed from three separate passes."""
    ids, mask = encode_prompts(composed.tokenizer, PROMPTS)
    policy = mixture(composed, Dial(weights=weights, alpha_0=alpha_0, alpha_tilde=alpha_tilde))
    assert policy.pass_names == ("a", "b", BASE)
    with torch.no_grad():
        got = DecodeBatch(composed).add(ids, mask, [policy] * len(PROMPTS))
    expected = _formula(_separate_passes(composed, ids, mask), weights, alpha_0, alpha_tilde)
    # the engine may return the logits up to a constant per row (one projection of combined hidden states)
    assert_close(F.log_softmax(got, -1), F.log_softmax(expected, -1), atol=1e-4, rtol=1e-4)


def test_composed_engine_equals_reference_decoder(composed, float32):
    """Greedy decoding of a composition of two adapters (one residual, one raw) by the engine equals the
    plain reference decoder's (a separate forward per adapter and for the base, no cache), prompt by prompt."""
    dial = Dial(weights={"a": 1.0, "b": 0.5}, alpha_0=0.7, alpha_tilde=1.3)
    ids, mask = encode_prompts(composed.tokenizer, PROMPTS)
    out = generate_ids(composed, ids, mask, DecodeConfig(max_new_tokens=6, weights=dict(dial.weights), alpha_0=0.7, alpha_tilde=1.3))
    expected = [reference_generate(composed, row, 6, dial) for row in token_rows(composed.tokenizer, PROMPTS)]
    assert engine_rows(out, eos_ids(composed)) == expected


def test_composed_greedy_decoding_equals_recomputation(composed):
    """Every greedy token of the cached composed decoding is the argmax of the formula recomputed from scratch."""
    weights, alpha_0, alpha_tilde = {"a": 1.0, "b": 0.5}, 0.7, 1.3
    ids, mask = encode_prompts(composed.tokenizer, PROMPTS)
    out = generate_ids(composed, ids, mask, DecodeConfig(max_new_tokens=5, weights=weights, alpha_0=alpha_0, alpha_tilde=alpha_tilde))
    eos = composed.tokenizer.eos_token_id
    for step in range(out.shape[1]):
        full = torch.cat([ids, out[:, :step]], 1)
        full_mask = torch.cat([mask, torch.ones(ids.shape[0], step, dtype=torch.long)], 1)
        expected = _formula(_separate_passes(composed, full, full_mask), weights, alpha_0, alpha_tilde)
        live = ~(out[:, :step] == eos).any(1)
        assert torch.equal(expected.argmax(-1)[live], out[live, step])


def test_base_pass_is_skipped_only_when_it_cancels(composed, float32):
    """With Σ of the residual weights = α₀ the base logits cancel, so the base rows are left out and the policy is unchanged."""
    ids, mask = encode_prompts(composed.tokenizer, PROMPTS)
    passes = _separate_passes(composed, ids, mask)
    for weights, alpha_0 in (({"a": 1.0, "b": 0.0}, 1.0), ({"a": 0.5, "b": 2.0}, 0.5)):
        policy = mixture(composed, Dial(weights=weights, alpha_0=alpha_0, alpha_tilde=1.3))
        assert BASE not in policy.pass_names and ("b" in policy.pass_names) == (weights["b"] != 0)
        with torch.no_grad():
            got = DecodeBatch(composed).add(ids, mask, [policy] * len(PROMPTS))
        assert_close(F.log_softmax(got, -1), F.log_softmax(_formula(passes, weights, alpha_0, 1.3), -1), atol=1e-4, rtol=1e-4)
    assert mixture(composed, Dial(alpha_0=0.5)).pass_names == ("a", "b", BASE)
    assert customized_logits({BASE: passes[BASE]}, mixture(composed, policy="base")).argmax(-1).equal(passes[BASE].argmax(-1))


def test_bad_weights_and_names_are_refused(composed, adapter_dirs):
    """Unknown adapters and non-finite weights name the problem; adapter names may not clash with model ids."""
    with pytest.raises(ConfigError, match="no adapter named c"):
        mixture(composed, Dial(weights={"c": 1.0}))
    with pytest.raises(ConfigError, match="finite"):
        DecodeConfig(weights={"a": float("nan")})
    with pytest.raises(ConfigError, match="adapter name"):
        QAdapterModel.from_pretrained({"base": adapter_dirs["a"]}, device="cpu")


def test_adapters_of_different_bases_are_refused(adapter_dirs, other_model_dir, tmp_path):
    """An adapter trained on another base cannot join a composition."""
    other = random_adapter(other_model_dir, tmp_path / "other", "residual", 3)
    with pytest.raises(ModelError, match="trained on different base models"):
        QAdapterModel.from_pretrained({"a": adapter_dirs["a"], "other": other}, device="cpu")


FAST = dict(learning_rate=5e-3, batch_size=8, micro_batch_size=4, warmup_ratio=0.0, epochs=3, lora_dropout=0.0,
            target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


def _marker_margins(qm, weights: dict[str, float], contexts: list[str]) -> dict[str, float]:
    """Mean log π̃(good) − log π̃(bad) and log π̃(yes) − log π̃(no) at the start of responses and after a few words."""
    tok = qm.tokenizer
    rows = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True) + lead
            for c in contexts for lead in ("", "the cat ", "it was very ")]
    ids, mask = encode_prompts(tok, rows, chat=False)
    with torch.no_grad():
        logp = F.log_softmax(DecodeBatch(qm).add(ids, mask, [mixture(qm, Dial(weights=weights))] * len(rows)), -1)
    vocab = tok.get_vocab()
    return {w: (logp[:, vocab[w]] - logp[:, vocab[v]]).mean().item() for w, v in (("good", "bad"), ("yes", "no"))}


def test_composition_satisfies_both_preferences(tiny_model_dir, tmp_path):
    """Adapters trained on two preferences ('good' over 'bad', 'yes' over 'no'), composed with weight 1 each,
    satisfy the worse-served preference better than either adapter alone, and both preferences over the base."""
    dirs = {}
    for name, (chosen, rejected) in {"good": ("good", "bad"), "yes": ("yes", "no")}.items():
        records = read_records(marker_records(40, seed=len(dirs), chosen=chosen, rejected=rejected)).records
        result = train(QAdapterConfig(**FAST), records, [], tmp_path / name, model=str(tiny_model_dir), progress=False, log=lambda s: None)
        dirs[name] = result.adapter_dir
    qm = QAdapterModel.from_pretrained(dirs, device="cpu")
    contexts = ["tell me about the dog", "what is the answer", "say something nice", "how are you", "where is the cat"]
    base = _marker_margins(qm, {"good": 0.0, "yes": 0.0}, contexts)
    alone = [_marker_margins(qm, {"good": 1.0, "yes": 0.0}, contexts), _marker_margins(qm, {"good": 0.0, "yes": 1.0}, contexts)]
    both = _marker_margins(qm, {"good": 1.0, "yes": 1.0}, contexts)
    assert both["good"] > base["good"] + 1.0 and both["yes"] > base["yes"] + 1.0
    assert min(both.values()) > max(min(m.values()) for m in alone) + 1.0


def test_cli_composes_named_adapters(adapter_dirs, composed):
    """`generate --adapter a=DIR --adapter b=DIR --weights a=1,b=0.5` prints what the Python API decodes; unnamed
    adapters of a composition and malformed weights are refused."""
    from typer.testing import CliRunner

    from qadapter.cli import app
    from qadapter.decode import generate

    adapters = ["--adapter", f"a={adapter_dirs['a']}", "--adapter", f"b={adapter_dirs['b']}"]
    result = CliRunner().invoke(app, ["generate", *adapters, "--weights", "a=1,b=0.5", "--max-new-tokens", "5", PROMPTS[0]])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == generate(composed, PROMPTS[0], DecodeConfig(max_new_tokens=5, weights={"a": 1.0, "b": 0.5}))[0]
    unnamed = CliRunner().invoke(app, ["generate", "--adapter", str(adapter_dirs["a"]), "--adapter", str(adapter_dirs["b"]), "hi"])
    assert unnamed.exit_code != 0 and "NAME=DIR" in str(unnamed.exception)
    bad = CliRunner().invoke(app, ["generate", *adapters, "--weights", "a=heavy", "hi"])
    assert bad.exit_code == 2 and "NAME=NUMBER" in bad.output
