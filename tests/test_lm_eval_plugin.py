"""The lm-evaluation-harness plugin: the ``qadapter`` lm-eval model scores and generates with the
customized policy π̃, and the shipped example task runs end to end offline (tiny model only)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from qadapter import objective  # noqa: E402
from qadapter.config import DecodeConfig, QAdapterConfig  # noqa: E402
from qadapter.decode import generate  # noqa: E402
from qadapter.eval.lm_eval_plugin import QAdapterLM  # noqa: E402
from qadapter.model import QAdapterModel, load_base  # noqa: E402

EXAMPLE_TASKS = Path(__file__).resolve().parents[1] / "examples" / "lm_eval"
ALPHA_0, ALPHA_TILDE = 0.5, 1.5


@pytest.fixture(autouse=True)
def _full_precision(monkeypatch):
    """Decode in float32 everywhere, so greedy choices cannot flip between two ways of computing them."""
    import qadapter.hardware

    monkeypatch.setattr(qadapter.hardware, "cpu_has_native_bf16", lambda: False)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A saved adapter whose LoRA B is perturbed, so Q ≠ 0 and π̃ differs from the base."""
    qmodel = QAdapterModel.create(
        load_base(str(tiny_model_dir), device="cpu"), QAdapterConfig(alpha_0=ALPHA_0, alpha_tilde=ALPHA_TILDE, lora_dropout=0.0)
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in qmodel.peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    folder = tmp_path_factory.mktemp("lm-eval") / "adapter"
    qmodel.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(adapter_dir) -> QAdapterModel:
    """The same adapter loaded independently of the plugin."""
    return QAdapterModel.from_pretrained(adapter_dir, device="cpu")


@pytest.fixture(scope="module")
def lm(adapter_dir) -> QAdapterLM:
    return QAdapterLM(adapter=str(adapter_dir), device="cpu", batch_size=2)


def _token_logprobs(qmodel: QAdapterModel, ids: list[int], policy: str, alpha_0: float = ALPHA_0) -> torch.Tensor:
    """log π(token t+1 | tokens ≤ t) for every t, computed directly with qadapter: (T-1,)."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        q, base_logprobs = qmodel.q_and_base_logprobs(input_ids, torch.ones_like(input_ids))
    logits = objective.combined_logits(q, base_logprobs, alpha_0, ALPHA_TILDE) if policy == "customized" else base_logprobs
    logprobs = F.log_softmax(logits[0, :-1], dim=-1)  # (T-1, V)
    return logprobs.gather(-1, input_ids[0, 1:, None]).squeeze(-1)


def _direct_loglikelihood(qmodel: QAdapterModel, context: str, continuation: str, policy: str, alpha_0: float = ALPHA_0) -> float:
    """Σ log π(continuation | context), the continuation being what follows the context's tokens."""
    tokenizer = qmodel.tokenizer
    whole = tokenizer(context + continuation)["input_ids"]
    n_context = len(tokenizer(context)["input_ids"])
    return float(_token_logprobs(qmodel, whole, policy, alpha_0)[n_context - 1 :].sum())


PAIRS = [("the cat sat", " on the mat"), ("hello there", " yes"), ("tell me about the dog", " it ran very fast")]


def test_registered_under_qadapter():
    from lm_eval.api.registry import get_model

    assert get_model("qadapter") is QAdapterLM


def test_loglikelihood_is_the_customized_policy(lm, reference):
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    results = lm.loglikelihood(requests)
    for (context, continuation), (logprob, _) in zip(PAIRS, results):
        customized = _direct_loglikelihood(reference, context, continuation, "customized")
        base = _direct_loglikelihood(reference, context, continuation, "base")
        assert logprob == pytest.approx(customized, abs=1e-4)
        assert abs(logprob - base) > 1e-2  # really π̃, not π₁


def test_dial_override(adapter_dir, lm, reference):
    dialled = QAdapterLM(qmodel=lm.qmodel, adapter=str(adapter_dir), alpha_0=2)
    assert dialled.alpha_0 == 2.0 and dialled.alpha_tilde == ALPHA_TILDE
    (logprob, _), = dialled.loglikelihood([Instance("loglikelihood", {}, PAIRS[0], 0)])
    assert logprob == pytest.approx(_direct_loglikelihood(reference, *PAIRS[0], "customized", alpha_0=2.0), abs=1e-4)
    with pytest.raises(ValueError, match="alpha_tilde"):
        QAdapterLM(qmodel=lm.qmodel, alpha_tilde=0)
    with pytest.raises(ValueError, match="adapter"):
        QAdapterLM()
    with pytest.raises(ValueError, match="pretrained"):
        QAdapterLM(qmodel=lm.qmodel, pretrained="gpt2")


def test_loglikelihood_rolling_is_the_customized_policy(lm, reference):
    texts = ["the dog ran on the log and the cat sat on the mat", "why is the sky blue"]
    results = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)])
    for text, logprob in zip(texts, results):
        # one window (the texts are far below max_length): the prefix token, then every token scored
        ids = [lm.prefix_token_id] + reference.tokenizer(text)["input_ids"]
        assert logprob == pytest.approx(float(_token_logprobs(reference, ids, "customized").sum()), abs=1e-4)
        assert abs(logprob - float(_token_logprobs(reference, ids, "base").sum())) > 1e-2


def _reference_text(reference: QAdapterModel, prompt: str, max_new_tokens: int) -> str:
    config = DecodeConfig(max_new_tokens=max_new_tokens, alpha_0=ALPHA_0, alpha_tilde=ALPHA_TILDE)
    return generate(reference, [prompt], config, chat=False)[0]


@pytest.mark.parametrize("batch_size", [2, 3])  # all three prompts in one batch too: rows end, and leave, at different steps
def test_generate_until_matches_qadapter_decoding(adapter_dir, lm, reference, batch_size):
    plugin = lm if batch_size == 2 else QAdapterLM(qmodel=lm.qmodel, adapter=str(adapter_dir), batch_size=batch_size)
    prompts = ["the cat sat", "tell me about", "what is the answer to the question"]
    budget = 16
    full = [_reference_text(reference, p, budget) for p in prompts]
    assert all(len(text.split()) >= 10 for text in full)  # long enough to be cut below
    stops = [" " + text.split()[7] for text in full]  # a word late in the text: rows end at different steps
    requests = [
        Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": budget, "do_sample": False}), i)
        for i, (prompt, stop) in enumerate(zip(prompts, stops))
    ]
    out = plugin.generate_until(requests)
    for text, stop, got in zip(full, stops, out):
        expected = text.split(stop)[0].strip()
        assert got.strip() == expected
        assert len(expected) < len(text)
    # without a stop string: the whole budget, as qadapter's own decoding
    (got,) = plugin.generate_until([Instance("generate_until", {}, (prompts[0], {"until": [], "max_gen_toks": budget}), 0)])
    assert got.strip() == full[0]


def test_generate_until_samples_when_asked(lm):
    torch.manual_seed(0)
    requests = [
        Instance("generate_until", {}, ("the cat sat", {"until": ["\n"], "max_gen_toks": 5, "do_sample": True, "temperature": 1.0, "top_p": 0.9}), 0)
    ]
    (text,) = lm.generate_until(requests)
    assert isinstance(text, str) and len(text.split()) <= 5


def test_example_task_end_to_end_offline(adapter_dir, tmp_path, monkeypatch):
    """The shipped YAML, unchanged, on a tiny copy of the benchmark file where its relative path
    points (src/qadapter/bundled_data/arc/arc_easy.jsonl.gz from the current directory), with the hub offline."""
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    words = "one two three four five six seven eight nine ten".split()
    records = [
        {"query": f"Question: what is {words[i]} and {words[i + 1]}", "choices": [words[i], words[i + 1], "red", "blue"], "gold": i % 4}
        for i in range(6)
    ]
    data = tmp_path / "src" / "qadapter" / "bundled_data" / "arc" / "arc_easy.jsonl.gz"
    data.parent.mkdir(parents=True)
    with gzip.open(data, "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")

    results = lm_eval.simple_evaluate(
        model="qadapter",
        model_args=f"adapter={adapter_dir},alpha_0=2",
        tasks=["arc_easy_local"],
        task_manager=TaskManager(include_path=str(EXAMPLE_TASKS), include_defaults=False),
        device="cpu",
        batch_size=4,
        limit=5,
        bootstrap_iters=0,
        log_samples=True,
    )
    scores = results["results"]["arc_easy_local"]
    assert 0.0 <= scores["acc,none"] <= 1.0 and 0.0 <= scores["acc_norm,none"] <= 1.0
    assert len(results["samples"]["arc_easy_local"]) == 5
    assert results["config"]["qadapter_alpha_0"] == 2.0
