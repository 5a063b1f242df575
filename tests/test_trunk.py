"""Top-K adaptation and the shared trunk: the layers below the adapted ones run once for every pass, and
each prompt runs once for all its responses, with exactly the unshared path's numbers (trunk.py)."""

from __future__ import annotations

import contextlib
import json
import logging

import pytest
import torch
from torch.testing import assert_close

from qadapter.collate import TokenizedPair, collate_pairs, pad_shared, tokenize_records
from qadapter.config import DecodeConfig, Dial, QAdapterConfig, parse_adapt_layers
from qadapter.data import read_records
from qadapter.decode import DecodeBatch, encode_prompts, generate_ids, mixture
from qadapter.errors import ConfigError
from qadapter.model import QAdapterModel, load_adapter, load_base, load_composition

from conftest import build_tokenizer, engine_rows, marker_records, reference_generate

LAYERS = 4


def _save_model(folder, config) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _small(cls, **extra):
    """A tiny random decoder of LAYERS layers on the test tokenizer."""
    return cls(
        vocab_size=len(build_tokenizer()), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, bos_token_id=1, **extra,
    )


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory):
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-llama-4")
    _save_model(folder, _small(LlamaConfig))
    return folder


def _randomize(qmodel, seed: int = 0, scale: float = 0.5) -> None:
    """Non-zero LoRA weights (a fresh adapter has Q ≡ 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in qmodel.peft_model.named_parameters():
            if "lora_" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _adapter(model_dir, seed: int = 0, **settings) -> QAdapterModel:
    config = QAdapterConfig(**{"lora_dropout": 0.0, "seed": seed, "adapt_layers": 2, **settings})
    qmodel = QAdapterModel.create(load_base(str(model_dir), device="cpu"), config)
    _randomize(qmodel, seed)
    return qmodel


@contextlib.contextmanager
def unshared(qmodel):
    """The same model with every pass through the whole model."""
    trunk, qmodel.trunk = qmodel.trunk, None
    try:
        yield qmodel
    finally:
        qmodel.trunk = trunk


def _lora_layers(peft_model) -> set[int]:
    return {int(name.split(".layers.")[1].split(".")[0]) for name, _ in peft_model.named_parameters() if "lora_" in name}


PAIRS = [  # two pairs share a prompt (and a chosen response), one has its own; lengths differ
    TokenizedPair((5, 6, 7), (8, 9, 2), (10, 2)),
    TokenizedPair((5, 6, 7), (8, 9, 2), (11, 12, 13, 14, 2)),
    TokenizedPair((15, 16), (17, 2), (18, 19, 2)),
]


# --- the option -----------------------------------------------------------------------------------


def test_adapt_layers_is_peft_layers_to_transform(deep_model_dir, tmp_path):
    """--adapt-layers K puts LoRA on the top K layers only, recorded as PEFT's layers_to_transform (plain PEFT
    loads it) and in the Q-Adapter config; the trunk starts at the lowest adapted layer, also after reloading."""
    from peft import PeftModel

    qmodel = _adapter(deep_model_dir)
    assert qmodel.peft_model.peft_config["default"].layers_to_transform == [2, 3]
    assert _lora_layers(qmodel.peft_model) == {2, 3}
    assert qmodel.trunk is not None and qmodel.trunk.split == 2
    qmodel.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["layers_to_transform"] == [2, 3]
    assert json.loads((tmp_path / "a" / "qadapter_config.json").read_text())["config"]["adapt_layers"] == 2
    loaded = load_adapter(tmp_path / "a")
    assert loaded.config.adapt_layers == 2 and loaded.trunk is not None and loaded.trunk.split == 2
    batch = collate_pairs(PAIRS, 0)
    with torch.no_grad():
        assert_close(loaded.run_passes(batch.input_ids, batch.attention_mask).h_adapter, qmodel.run_passes(batch.input_ids, batch.attention_mask).h_adapter)
    plain = PeftModel.from_pretrained(load_base(str(deep_model_dir), device="cpu").model, str(tmp_path / "a"))
    assert _lora_layers(plain) == {2, 3}


def test_adapt_layers_as_indices_and_out_of_range(deep_model_dir):
    qmodel = _adapter(deep_model_dir, adapt_layers=[3, 1])
    assert _lora_layers(qmodel.peft_model) == {1, 3} and qmodel.trunk.split == 1
    for bad in (LAYERS + 1, [LAYERS]):
        with pytest.raises(ConfigError, match="adapt_layers"):
            QAdapterModel.create(load_base(str(deep_model_dir), device="cpu"), QAdapterConfig(adapt_layers=bad))
    assert _adapter(deep_model_dir, adapt_layers=None).trunk is None  # every layer adapted: nothing to share


def test_peers_get_the_same_lora_placement(tiny_model_dir):
    """The TRL peers (sft, dpo, replay) train with lora_config(config, base): the same layers_to_transform."""
    from qadapter.model import lora_config

    base = load_base(str(tiny_model_dir), device="cpu")
    assert lora_config(QAdapterConfig(adapt_layers=1), base.model).layers_to_transform == [1]
    assert lora_config(QAdapterConfig(), base.model).layers_to_transform is None


@pytest.mark.parametrize("bad", [0, -1, True, [1, 1], [], ["2"], 2.0])
def test_adapt_layers_values_are_checked(bad):
    with pytest.raises(ConfigError, match="adapt_layers"):
        QAdapterConfig(adapt_layers=bad)


def test_adapt_layers_on_the_command_line(parse_train):
    assert parse_adapt_layers("8") == 8 and parse_adapt_layers("20,21,22") == [20, 21, 22] and parse_adapt_layers("5,") == [5]
    assert parse_adapt_layers("all") is None
    assert parse_train("--adapt-layers", "8")["config"].adapt_layers == 8
    assert parse_train("--adapt-layers", "20,21")["config"].adapt_layers == [20, 21]
    assert parse_train()["config"].adapt_layers is None
    refused = parse_train("--adapt-layers", "top")
    assert isinstance(refused, SystemExit) and refused.code == 2  # a usage error, as for any bad option value


# --- training and scoring: the same numbers -------------------------------------------------------


@pytest.mark.parametrize("hidden_path", [True, False])
@pytest.mark.parametrize("q_form", ["residual", "raw"])
def test_trunk_passes_equal_whole_model_passes(deep_model_dir, hidden_path, q_form):
    qmodel = _adapter(deep_model_dir, q_form=q_form)
    qmodel.hidden_path = hidden_path
    batch = collate_pairs(PAIRS, 0, padding_side="left")
    shared = qmodel.run_passes(batch.input_ids, batch.attention_mask)
    with unshared(qmodel):
        whole = qmodel.run_passes(batch.input_ids, batch.attention_mask)
    for name in ("h_adapter", "h_base") if hidden_path else ("q", "base_logprobs"):
        assert_close(getattr(shared, name), getattr(whole, name))
    assert shared.h_base is None or not shared.h_base.requires_grad  # the base pass builds no graph


def _loss_and_grads(qmodel, batch, prompts_once: bool):
    qmodel.peft_model.zero_grad(set_to_none=True)
    if prompts_once:
        terms = qmodel.token_terms(batch)
    else:
        terms = qmodel.run_passes(batch.input_ids, batch.attention_mask).terms(batch.completion_mask)
    out = qmodel.pair_objective(terms, batch)
    out.loss.mean().backward()
    grads = {n: p.grad.clone() for n, p in qmodel.peft_model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize("adapt_layers", [2, None])
@pytest.mark.parametrize("hidden_path", [True, False])
def test_prompt_once_per_pair_gives_the_unshared_loss_and_gradients(deep_model_dir, adapt_layers, hidden_path):
    """Training runs each distinct prompt once (its KV cache, with gradient, serving every response to it),
    and with top-K the layers below once for both passes: loss and LoRA gradients equal those of whole rows
    through the whole model."""
    qmodel = _adapter(deep_model_dir, adapt_layers=adapt_layers, beta=0.5)
    qmodel.hidden_path = hidden_path
    batch = collate_pairs(PAIRS, 0)
    assert batch.shared.context_ids.shape[0] == 2 and batch.shared.ids.shape[0] == batch.input_ids.shape[0]
    fast, fast_grads = _loss_and_grads(qmodel, batch, prompts_once=True)
    with unshared(qmodel):
        slow, slow_grads = _loss_and_grads(qmodel, batch, prompts_once=False)
    assert_close(fast.loss, slow.loss)
    assert_close(fast.chosen_rewards, slow.chosen_rewards)
    assert fast_grads.keys() == slow_grads.keys() and all(g is not None for g in fast_grads.values())
    for name in slow_grads:
        assert_close(fast_grads[name], slow_grads[name], rtol=1e-4, atol=1e-6)


def test_scoring_shared_contexts_equals_unshared(deep_model_dir):
    """Continuations of shared contexts (retention scoring) give the same terms with the trunk."""
    qmodel = _adapter(deep_model_dir)
    shared = pad_shared([((5, 6, 7), [(8, 9), (10,)]), ((11,), [(12, 13, 14)])], 0)
    fast = qmodel.run_shared_passes(shared).terms(shared.completion_mask, Dial(alpha_0=0.5))
    with unshared(qmodel):
        slow = qmodel.run_shared_passes(shared).terms(shared.completion_mask, Dial(alpha_0=0.5))
    for name in ("q_taken", "values", "base_logp", "policy_logp"):
        assert_close(getattr(fast, name), getattr(slow, name))


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_training_uses_prompts_once_and_the_trunk(deep_model_dir, tmp_path, monkeypatch, precision):
    """A real training run (float32, or bf16 autocast as on a GPU) goes through the shared path (single process)."""
    from qadapter.training import train

    calls = []
    original = QAdapterModel._shared_passes
    monkeypatch.setattr(QAdapterModel, "_shared_passes", lambda self, shared: calls.append(self.trunk) or original(self, shared))
    records = read_records(marker_records(8)).records
    config = QAdapterConfig(max_steps=2, batch_size=4, micro_batch_size=4, adapt_layers=2, lora_dropout=0.0)
    result = train(config, records, [], tmp_path / "run", model=str(deep_model_dir), mixed_precision=precision, progress=False, log=lambda s: None)
    assert result.metrics["history"][-1]["loss"] is not None
    assert len(calls) == 2 and all(trunk is not None and trunk.split == 2 for trunk in calls)
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["layers_to_transform"] == [2, 3]


# --- decoding: the same tokens and logits ---------------------------------------------------------


def _lockstep(qmodel, float32):
    """Drive a trunk batch and an unshared batch through the same joins, steps and leaves; compare logits."""
    prompts = ["tell me about the cat", "why is the dog so big and red", "hello", "one two three"]
    ids, mask = encode_prompts(qmodel.tokenizer, prompts)
    customized = mixture(qmodel, Dial(alpha_0=0.5, alpha_tilde=1.5))
    single = mixture(qmodel, Dial(alpha_0=1.0, alpha_tilde=1.0))  # residual at α₀ = 1: one row, no base pass
    base = mixture(qmodel, policy="base")
    fast = DecodeBatch(qmodel)
    with unshared(qmodel):
        slow = DecodeBatch(qmodel)
    assert fast.trunk is not None and slow.trunk is None

    def both(fn):
        a = fn(fast)
        with unshared(qmodel):
            b = fn(slow)
        assert_close(a, b, rtol=1e-4, atol=1e-4)
        return a

    logits = both(lambda batch: batch.add(ids[:2], mask[:2], [customized, base]))
    for _ in range(3):
        tokens = logits.argmax(-1)
        logits = both(lambda batch: batch.step(tokens))
    joined = both(lambda batch: batch.add(ids[2:], mask[2:], [single, customized]))  # join a running batch
    logits = torch.cat([logits, joined])
    for keep in ([0, 2, 3], [2, 1], [1]):  # leave, reorder, leave
        tokens = logits.argmax(-1)
        logits = both(lambda batch: batch.step(tokens))
        both(lambda batch: batch.keep(keep) or torch.zeros(1))
        logits = logits[keep]
        tokens = logits.argmax(-1)
        logits = both(lambda batch: batch.step(tokens))


def test_decode_batch_equals_unshared_with_joins_and_leaves(deep_model_dir, float32):
    _lockstep(_adapter(deep_model_dir), float32)


def test_decode_batch_equals_unshared_without_hidden_path(deep_model_dir, float32):
    qmodel = _adapter(deep_model_dir)
    qmodel.hidden_path = False
    _lockstep(qmodel, float32)


def test_greedy_decoding_equals_reference_decoder(deep_model_dir, float32):
    """The engine with the trunk decodes what the plain reference decoder (whole-model forwards) does."""
    qmodel = _adapter(deep_model_dir, alpha_0=0.5, alpha_tilde=1.5)
    prompts = ["tell me about the cat", "why is the dog so big and red", "hello"]
    ids, mask = encode_prompts(qmodel.tokenizer, prompts)
    out = generate_ids(qmodel, ids, mask, DecodeConfig(max_new_tokens=8))
    from qadapter.decode import eos_ids, token_rows

    for row, prompt in zip(engine_rows(out, eos_ids(qmodel)), token_rows(qmodel.tokenizer, prompts)):
        assert row == reference_generate(qmodel, prompt, 8)
    with unshared(qmodel):
        assert torch.equal(generate_ids(qmodel, ids, mask, DecodeConfig(max_new_tokens=8)), out)


def test_composition_shares_the_trunk_of_its_lowest_adapter(deep_model_dir, tmp_path, float32):
    """Adapters on layers [2, 3] and [3] compose on one trunk, split at layer 2; one on every layer shares nothing."""
    for name, layers, seed in (("a", 2, 0), ("b", 1, 1), ("c", None, 2)):
        _adapter(deep_model_dir, seed=seed, adapt_layers=layers).save_pretrained(tmp_path / name)
    composed = load_composition({"a": tmp_path / "a", "b": tmp_path / "b"})
    assert composed.trunk is not None and composed.trunk.split == 2
    _lockstep(composed, float32)
    ids, mask = encode_prompts(composed.tokenizer, ["tell me about the cat", "hello"])
    config = DecodeConfig(max_new_tokens=6, weights={"a": 1.0, "b": 0.5}, alpha_0=0.7)
    out = generate_ids(composed, ids, mask, config)
    with unshared(composed):
        assert torch.equal(generate_ids(composed, ids, mask, config), out)
    assert load_composition({"a": tmp_path / "a", "c": tmp_path / "c"}).trunk is None


# --- families ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_other_families_share_their_trunk(tmp_path, float32, family):
    """Qwen2, Qwen3 (q/k norms) and Mistral without a sliding window: same losses and decoding as the whole model."""
    import transformers

    config = {
        "qwen2": lambda: _small(transformers.Qwen2Config),
        "qwen3": lambda: _small(transformers.Qwen3Config, head_dim=16),
        "mistral": lambda: _small(transformers.MistralConfig, sliding_window=None),
    }[family]()
    _save_model(tmp_path, config)
    qmodel = _adapter(tmp_path)
    assert qmodel.trunk is not None and qmodel.trunk.split == 2
    batch = collate_pairs(PAIRS, 0)
    fast, _ = _loss_and_grads(qmodel, batch, prompts_once=True)
    with unshared(qmodel):
        slow, _ = _loss_and_grads(qmodel, batch, prompts_once=False)
    assert_close(fast.loss, slow.loss)
    _lockstep(qmodel, float32)


def test_unknown_layout_falls_back_with_one_notice(tmp_path, caplog):
    """A decoder the trunk does not drive (here: sliding-window attention) runs the unshared path, saying so once."""
    from transformers import MistralConfig

    _save_model(tmp_path, _small(MistralConfig, sliding_window=4))
    with caplog.at_level(logging.WARNING, logger="qadapter"):
        qmodel = _adapter(tmp_path)
    notices = [r for r in caplog.records if "shared trunk" in r.getMessage()]
    assert len(notices) == 1 and "sliding-window" in notices[0].getMessage() and "\n" not in notices[0].getMessage()
    assert qmodel.trunk is None
    batch = collate_pairs(PAIRS, 0)
    qmodel.token_terms(batch)  # the unshared path still serves (prompts still once)


def test_training_data_prompts_are_grouped_once(tiny_model_dir):
    """collate_pairs' shared layout holds each distinct prompt once and the rows in the batch's order."""
    tokenizer = build_tokenizer()
    pairs, _ = tokenize_records(read_records(marker_records(2, pairs_per_prompt=2)).records, tokenizer, 64, 32)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    shared = batch.shared
    assert shared.context_ids.shape[0] == 2
    for row in range(batch.input_ids.shape[0]):
        real = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        context = shared.context_ids[shared.owner[row]][shared.context_mask[shared.owner[row]].bool()].tolist()
        assert real == context + shared.ids[row][shared.mask[row].bool()].tolist()


@pytest.mark.bundled
def test_bundled_trunk_equals_whole_model(float32):
    """The bundled SmolLM2 (30 layers), LoRA on the top 8 with weights of a trained adapter's size: the loss and
    gradients of prompts once through the trunk equal those of whole rows through the whole model, up to float32
    rounding over 30 layers (the trunk itself adds none: it equals prompts once through the whole model, bit for bit
    on the machine this was written on)."""
    qmodel = QAdapterModel.create(load_base("bundled", device="cpu"), QAdapterConfig(adapt_layers=8, lora_dropout=0.0))
    _randomize(qmodel, scale=0.02)
    assert qmodel.trunk is not None and qmodel.trunk.split == 22
    batch = collate_pairs(PAIRS, qmodel.tokenizer.pad_token_id)
    fast, fast_grads = _loss_and_grads(qmodel, batch, prompts_once=True)
    with unshared(qmodel):
        slow, slow_grads = _loss_and_grads(qmodel, batch, prompts_once=False)
        same, same_grads = _loss_and_grads(qmodel, batch, prompts_once=True)
    assert_close(fast.loss, slow.loss, rtol=1e-5, atol=1e-5)
    for name in slow_grads:
        assert float((fast_grads[name] - slow_grads[name]).norm()) <= 1e-4 * float(slow_grads[name].norm())
        assert_close(fast_grads[name], same_grads[name], rtol=1e-6, atol=1e-9)


def test_finding_the_trunk_leaves_training_modes_alone(deep_model_dir):
    """The numerical check runs in eval mode and puts every module's mode back (a model fresh from a trainer)."""
    from qadapter.trunk import find_trunk

    qmodel = _adapter(deep_model_dir, lora_dropout=0.5)
    qmodel.set_training(True)
    before = {name: m.training for name, m in qmodel.peft_model.named_modules()}
    assert find_trunk(qmodel.peft_model) is not None
    assert {name: m.training for name, m in qmodel.peft_model.named_modules()} == before


def test_server_batches_on_the_trunk(deep_model_dir, tmp_path):
    """Continuous batching in the server over a composition of top-K adapters: 8 concurrent streamed requests on
    4 batch slots (joining and leaving mid-flight) answer, greedily, what each alone answers through the whole model."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from concurrent.futures import ThreadPoolExecutor

    from qadapter.decode import generate
    from qadapter.serve import create_app

    from conftest import running

    for name, layers, seed in (("a", 2, 0), ("b", 1, 1)):
        _adapter(deep_model_dir, seed=seed, adapt_layers=layers).save_pretrained(tmp_path / name)
    composed = load_composition({"a": tmp_path / "a", "b": tmp_path / "b"})
    assert composed.trunk is not None
    prompts = ["tell me about the cat", "why is the dog so big", "hello there", "say something good", "what is the answer",
               "where is the red mat", "one two three", "how fast is the blue dog"]
    models = ["a", "b", "a+b", "base"]

    def local(i: int) -> str:
        model = models[i % 4]
        weights = {"a": float(model in ("a", "a+b")), "b": float(model in ("b", "a+b"))}
        config = DecodeConfig(max_new_tokens=6 + 2 * i, weights=weights)
        return generate(composed, [prompts[i]], config, policy="base" if model == "base" else "customized")[0]

    with unshared(composed):
        expected = [local(i) for i in range(8)]
    assert len(set(expected)) > 4  # real, different answers
    with running(create_app(composed, max_batch_size=4)) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(i: int) -> str:
            stream = client.chat.completions.create(model=models[i % 4], messages=[{"role": "user", "content": prompts[i]}],
                                                    max_tokens=6 + 2 * i, temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
    assert [a.strip() for a in answers] == expected
