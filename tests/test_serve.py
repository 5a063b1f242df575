"""The OpenAI-compatible server on a tiny model: the official client, streaming, errors, disconnects, concurrency."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")


from qadapter.config import DecodeConfig  # noqa: E402
from qadapter.decode import DecodeBatch, encode_prompts, generate, generate_ids, mixture  # noqa: E402
from qadapter.model import QAdapterModel  # noqa: E402
from qadapter.serve import create_app  # noqa: E402

from conftest import random_adapter, running  # noqa: E402

PROMPTS = ["tell me about the cat", "why is the dog so big", "hello there", "say something good", "what is the answer",
           "where is the red mat", "one two three", "how fast is the blue dog"]


@pytest.fixture(scope="module")
def qmodel(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    dirs = {"a": random_adapter(tiny_model_dir, root / "a", "residual", 1), "b": random_adapter(tiny_model_dir, root / "b", "raw", 2)}
    return QAdapterModel.from_pretrained(dirs, device="cpu")


@pytest.fixture(scope="module")
def server(qmodel):
    """uvicorn in a background thread on a free loopback port; at most 4 requests per batch, so 8 clients queue and join mid-flight."""
    app = create_app(qmodel, max_batch_size=4)
    with running(app) as port:
        yield app, port


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[1]}/v1", api_key="unused", max_retries=0, timeout=30)


def _local(qmodel, prompt, chat=True, max_tokens=8, policy="customized", **decode) -> str:
    """The same request decoded in-process, alone (greedy)."""
    return generate(qmodel, [prompt], DecodeConfig(max_new_tokens=max_tokens, **decode), policy=policy, chat=chat)[0]


def _post(port: int, path: str, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    status, data = response.status, json.loads(response.read())
    conn.close()
    return status, data


def test_models_lists_base_and_every_combination(client):
    assert [m.id for m in client.models.list()] == ["base", "a", "b", "a+b"]
    assert client.models.retrieve("a+b").id == "a+b"


def test_chat_and_completions_equal_local_decoding(client, qmodel):
    """Greedy answers equal in-process decoding of the same policy: one adapter, a weighted composition with the dial turned, the base."""
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8, temperature=0)
    assert chat.choices[0].message.content.strip() == _local(qmodel, PROMPTS[0], weights={"b": 0})
    assert chat.usage.completion_tokens <= 8 and chat.usage.prompt_tokens > 0
    composed = client.chat.completions.create(
        model="a+b", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=8, temperature=0,
        extra_body={"adapter_weights": {"b": 0.5}, "alpha_0": 0.7, "alpha_tilde": 1.3},
    )
    assert composed.choices[0].message.content.strip() == _local(qmodel, PROMPTS[1], weights={"b": 0.5}, alpha_0=0.7, alpha_tilde=1.3)
    text = client.completions.create(model="base", prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert text.choices[0].text.strip() == _local(qmodel, PROMPTS[2], chat=False, policy="base")
    assert text.choices[0].finish_reason in ("stop", "length")


def test_streaming_equals_non_streaming(client):
    """Streamed deltas add up to the non-streamed answer; the last chunk has the finish reason, then the usage."""
    kwargs = dict(model="a+b", messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed = client.completions.create(model="b", prompt=PROMPTS[4], max_tokens=6, temperature=0, stream=True)
    text = client.completions.create(model="b", prompt=PROMPTS[4], max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text


def test_stop_sequences_end_the_text(client, qmodel):
    """The answer ends before the first stop sequence, streamed or not."""
    full = client.completions.create(model="a", prompt=PROMPTS[5], max_tokens=12, temperature=0, extra_body={"min_tokens": 12}).choices[0].text
    word = full.split()[2]
    cut = client.completions.create(model="a", prompt=PROMPTS[5], max_tokens=12, temperature=0, stop=[word], extra_body={"min_tokens": 12})
    assert cut.choices[0].text == full[: full.index(word)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="a", prompt=PROMPTS[5], max_tokens=12, temperature=0, stop=word, stream=True, extra_body={"min_tokens": 12})
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


@pytest.mark.parametrize(
    "body,status,param,code",
    [
        (b'{"model": "a", "messages": [', 400, None, None),
        (b'[1, 2]', 400, None, None),
        (json.dumps({"model": "c", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "model", "model_not_found"),
        (json.dumps({"model": "a+a", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "model", "model_not_found"),
        (json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}).encode(), 400, "max_tokens", None),
        (json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12}).encode(), 400, "max_tokens", "context_length_exceeded"),
        (json.dumps({"model": "a", "messages": [{"role": "user", "content": "the cat " * 200}]}).encode(), 400, "messages", "context_length_exceeded"),
        (json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "adapter_weights": {"b": 1}}).encode(), 400, "adapter_weights", None),
        (json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "adapter_weights": {"a": "x"}}).encode(), 400, "adapter_weights", None),
        (b'{"model": "a+b", "messages": [{"role": "user", "content": "hi"}], "adapter_weights": {"a": NaN}}', 400, "adapter_weights", None),
        (b'{"model": "a", "messages": [{"role": "user", "content": "hi"}], "alpha_0": Infinity}', 400, "alpha_0", None),
        (json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}).encode(), 400, "temperature", None),
        (json.dumps({"model": "a", "messages": []}).encode(), 400, "messages", None),
        (json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), 400, "n", None),
    ],
    ids=["malformed-json", "not-an-object", "unknown-model", "repeated-adapter", "negative-max-tokens", "absurd-max-tokens",
         "over-long-prompt", "weight-outside-model", "weight-not-number", "weight-nan", "alpha-infinite", "negative-temperature",
         "no-messages", "several-choices"],
)
def test_bad_requests_get_openai_errors(server, body, status, param, code):
    """Every bad request gets a 4xx with OpenAI's error body naming the field, and the server keeps serving."""
    got, data = _post(server[1], "/v1/chat/completions", body)
    assert got == status, data
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["message"]
    assert data["error"]["param"] == param and data["error"]["code"] == code
    ok, answer = _post(server[1], "/v1/completions", json.dumps({"model": "base", "prompt": "hello", "max_tokens": 2}).encode())
    assert ok == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")


def test_disconnect_mid_stream_frees_the_slot(server, client):
    """A client that goes away mid-stream leaves the batch (counted as cancelled) long before its max_tokens."""
    scheduler = server[0].state.scheduler
    before = scheduler.left["cancelled"]
    stream = client.chat.completions.create(model="a+b", messages=[{"role": "user", "content": "hello"}], max_tokens=200,
                                            stream=True, extra_body={"min_tokens": 200})
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + 10
    while (scheduler.left["cancelled"] == before or scheduler.running) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scheduler.left["cancelled"] == before + 1 and not scheduler.running


def test_concurrent_streaming_clients_all_succeed(client, qmodel):
    """8 streaming clients at once (batches of at most 4: the rest queue, then join mid-flight) on all four models;
    each greedy answer equals the same request decoded alone."""
    models = ["base", "a", "b", "a+b"]

    def ask(i: int) -> str:
        stream = client.chat.completions.create(model=models[i % 4], messages=[{"role": "user", "content": PROMPTS[i]}],
                                                max_tokens=6 + 2 * i, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for i, answer in enumerate(answers):
        weights = {"a": float(models[i % 4] in ("a", "a+b")), "b": float(models[i % 4] in ("b", "a+b"))}
        expected = _local(qmodel, PROMPTS[i], max_tokens=6 + 2 * i, weights=weights, policy="base" if models[i % 4] == "base" else "customized")
        assert answer.strip() == expected


def test_joining_and_leaving_mid_flight_changes_no_sequence(qmodel):
    """The batch engine under the server: sequences that join a running batch (a longer prompt: the running cache is
    padded in front) or leave it (from the middle; then padding every row left has is trimmed) decode, greedily, the same
    tokens as each alone."""
    configs = [DecodeConfig(), DecodeConfig(weights={"b": 0.5}, alpha_0=0.7), DecodeConfig(weights={"a": 0.0, "b": 0.0})]
    prompts = [PROMPTS[0], PROMPTS[7], "the big red dog sat on the mat and the small blue cat ran on the log"]
    lengths = [3, 8, 2]
    tok, eos = qmodel.tokenizer, torch.tensor([qmodel.tokenizer.eos_token_id])
    alone = []
    for prompt, config, n in zip(prompts, configs, lengths):
        ids, mask = encode_prompts(tok, [prompt])
        alone.append(generate_ids(qmodel, ids, mask, DecodeConfig(max_new_tokens=n, min_new_tokens=n, weights=config.weights, alpha_0=config.alpha_0))[0].tolist())
    policies = [mixture(qmodel, config.dial) for config in configs]
    batch, out = DecodeBatch(qmodel), [[], [], []]
    with torch.no_grad():
        ids, mask = encode_prompts(tok, prompts[:2])
        logits, live = batch.add(ids, mask, policies[:2]), [0, 1]
        while live:
            tokens = logits.index_fill(-1, eos, float("-inf")).argmax(-1)
            for seq, token in zip(live, tokens.tolist()):
                out[seq].append(token)
            keep = [i for i, seq in enumerate(live) if len(out[seq]) < lengths[seq]]
            batch.keep(keep)
            live = [live[i] for i in keep]
            logits = batch.step(tokens[keep]) if live else None
            if len(out[1]) == 2:  # sequence 2 joins mid-flight
                ids, mask = encode_prompts(tok, prompts[2:])
                logits, live = torch.cat([logits, batch.add(ids, mask, policies[2:])]), live + [2]
    assert out == alone
