"""Shared fixtures: a tiny random Llama and a word-level tokenizer built locally (no network)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

# The tests read only the data shipped with the package (or folders they build): a developer's
# QADAPTER_DATA_DIR, or a ../shared beside the checkout, must not change what they see.
os.environ.pop("QADAPTER_DATA_DIR", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub; hub calls are mocked

WORDS = (
    "the a cat dog sat ran on mat log red blue green big small fast slow tell me about say something "
    "good bad nice poor why how what when where is are was were and or but so very quite it this that "
    "answer question hello there yes no maybe one two three four five six seven eight nine ten"
).split()
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + ["system", "user", "assistant", "tool"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    return LlamaForCausalLM(config)


@pytest.fixture()
def float32(monkeypatch):
    """Exactness tests check float32 arithmetic: pin what 'auto' resolves to, whatever the CPU
    (on one with native bf16, 'auto' picks bf16)."""
    from qadapter.hardware import AUTO_PRECISION_ENV

    monkeypatch.setenv(AUTO_PRECISION_ENV, "no")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer folder, loadable by qadapter.load_base like any local model."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def byte_level_alphabet() -> list[str]:
    """GPT-2's 256 byte-level characters (every byte spelled as one printable character)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(moved))]


def llama_gguf_permute(w, n_head: int):
    """llama.cpp's convert_hf_to_gguf.py q/k row order, written out here independently of qadapter.export."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, seed: int = 0):
    """A tiny random Llama with a byte-level BPE tokenizer and a chat template, written as an F32 GGUF the
    way llama.cpp's converter lays it out (the bundled model's layout, at toy size). Returns the HF model."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_level_alphabet(), "Ġt", "he", "Ġthe"]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(16)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied: llama.cpp reads the embeddings
            continue
        array = tensor.numpy().copy()
        if ".q_proj." in name or ".k_proj." in name:
            array = llama_gguf_permute(array, 4 if ".q_proj." in name else 2)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny Llama GGUF file (see write_tiny_gguf): a GGUF base, as the bundled model is one."""
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.F32.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh $QADAPTER_CACHE for this test (converted GGUFs, the hash index)."""
    folder = tmp_path / "cache-a"
    monkeypatch.setenv("QADAPTER_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """Same architecture as tiny_model_dir, different weights."""
    folder = tmp_path_factory.mktemp("tiny-llama-other")
    tokenizer = build_tokenizer()
    build_model(len(tokenizer), seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def marker_records(n_prompts: int, seed: int = 0, pairs_per_prompt: int = 2, chosen: str = "good", rejected: str = "bad") -> list[dict]:
    """Synthetic conversational pairs: the response containing ``chosen`` beats the same response with ``rejected`` instead."""
    rng = random.Random(seed)
    filler = [w for w in WORDS if w not in (chosen, rejected)]
    rows = []
    for _ in range(n_prompts):
        prompt = " ".join(rng.choices(filler, k=rng.randint(3, 6)))
        for _ in range(pairs_per_prompt):
            body = rng.choices(filler, k=rng.randint(3, 6))
            pos = rng.randrange(len(body) + 1)
            good = body[:pos] + [chosen] + body[pos:]
            bad = body[:pos] + [rejected] + body[pos:]
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": " ".join(good)}],
                    "rejected": [{"role": "assistant", "content": " ".join(bad)}],
                }
            )
    return rows


def random_adapter(model_dir: Path, folder: Path, q_form: str = "residual", seed: int = 0) -> Path:
    """Save an adapter on ``model_dir`` with random non-zero LoRA weights (a fresh one has Q ≡ 0)."""
    from qadapter.config import QAdapterConfig
    from qadapter.model import QAdapterModel, load_base

    qm = QAdapterModel.create(load_base(str(model_dir), device="cpu"), QAdapterConfig(q_form=q_form, lora_dropout=0.0, seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in qm.peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    qm.save_pretrained(folder)
    return folder


class ShellPayload:
    """A pickle payload: unpickling it runs a shell command that creates ``path`` (a planted os.system call)."""

    def __init__(self, path: Path):
        self.command = f"touch {path}"

    def __reduce__(self):
        return (os.system, (self.command,))


@contextlib.contextmanager
def running(app):  # used by the server tests
    """uvicorn with the server's own settings (server_config: the head deadline) in a thread, on a free loopback port."""
    import uvicorn

    from qadapter.serve import server_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(server_config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    try:
        yield sock.getsockname()[1]
    finally:
        srv.should_exit = True
        thread.join(timeout=20)
        sock.close()


@torch.no_grad()
def reference_logits(qmodel, ids: list[int], dial=None) -> torch.Tensor:
    """The customized policy's next-token logits after ``ids``, computed plainly: a full forward of the
    base and one of each adapter, then (Σ_i w_i·Q_i + α₀ log π₁)/α̃. Returns (1, V)."""
    from qadapter import objective
    from qadapter.config import Dial

    dial = (dial or Dial()).resolve(qmodel.adapters)
    model, first = qmodel.peft_model, next(iter(qmodel.adapters))
    idx = torch.tensor([ids])  # (1, T)
    with model.disable_adapter():
        base = model(input_ids=idx).logits[:, -1].float()  # the base π₁'s logits at the last position, (1, V)
    q = torch.zeros_like(base)  # Σ_i w_i·Q_i, (1, V)
    for name, weight in dial.weights.items():
        model.set_adapter(name)  # this adapter alone
        adapted = model(input_ids=idx).logits[:, -1].float()  # (1, V)
        q += weight * objective.q_values(adapted, base, qmodel.adapters[name].q_form)
    model.set_adapter(first)
    return objective.combined_logits(q, torch.log_softmax(base, -1), dial.alpha_0, dial.alpha_tilde)  # (1, V)


def reference_generate(qmodel, prompt: list[int], max_new_tokens: int, dial=None) -> list[int]:
    """The decoding engine's test oracle, read as nanoGPT's ``generate``: one prompt, no cache, no
    batching, greedy. Per step :func:`reference_logits`, argmax, append; it stops after EOS."""
    from qadapter.decode import eos_ids

    out: list[int] = []
    for _ in range(max_new_tokens):
        out.append(int(reference_logits(qmodel, prompt + out, dial).argmax(-1)))  # greedy
        if out[-1] in eos_ids(qmodel):
            break
    return out


def engine_rows(tokens: torch.Tensor, eos: list[int]) -> list[list[int]]:
    """generate_ids' (b, n) output as per-row token lists that end at (and include) their EOS."""
    rows = []
    for row in tokens.tolist():
        end = next((k for k, t in enumerate(row) if t in eos), len(row) - 1)
        rows.append(row[: end + 1])
    return rows


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    """A JSONL file of 40 marker pairs (20 prompts), for command-line tests."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in marker_records(20)) + "\n")
    return path


class ParsedCommand(Exception):
    """Raised in place of training: the command line has been parsed."""


@pytest.fixture()
def parse_train(monkeypatch, data_file):
    """`qadapter train --data <marker pairs> ARGS` up to the training call: what training would get (its
    config and keywords), or the exception the command ended with instead."""
    import qadapter.training
    from typer.testing import CliRunner

    from qadapter.cli import app

    seen: dict = {}

    def stand_in(config, *args, **kwargs):
        seen.update(kwargs, config=config)
        raise ParsedCommand

    monkeypatch.setattr(qadapter.training, "train", stand_in)

    def parse(*args: str):
        result = CliRunner().invoke(app, ["train", "--data", str(data_file), *args])
        return seen if isinstance(result.exception, ParsedCommand) else result.exception

    return parse
