"""The OpenAI-compatible server on a tiny model: the official client, streaming, errors, disconnects, concurrency,
seeds, several choices, log-probabilities, refused fields, health, version and metrics."""

from __future__ import annotations

import http.client
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")


import qadapter  # noqa: E402
from qadapter.config import DecodeConfig, Dial  # noqa: E402
from qadapter.decode import DecodeBatch, encode_prompts, eos_ids, generate, generate_ids, mixture, token_rows  # noqa: E402
from qadapter.model import QAdapterModel  # noqa: E402
from qadapter.serve import create_app  # noqa: E402

from conftest import random_adapter, reference_logits, running  # noqa: E402

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


def _get(port: int, path: str) -> tuple[int, str, str]:
    """Status, content type and text of a GET."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    status, kind, text = response.status, response.getheader("content-type", ""), response.read().decode()
    conn.close()
    return status, kind, text


def test_models_lists_base_and_every_combination(client, qmodel):
    """Every entry as vLLM's: the checkpoint it runs on (root), the base entry for adapter entries (parent), the context."""
    models = client.models.list().data
    assert [m.id for m in models] == ["base", "a", "b", "a+b"]
    assert client.models.retrieve("a+b").id == "a+b"
    for m in models:
        assert m.model_extra == {"root": qmodel.identity.name, "parent": None if m.id == "base" else "base", "max_model_len": 256}


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
        (json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "n": 129}).encode(), 400, "n", None),
        (json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}).encode(), 400, "top_logprobs", None),
        (json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}).encode(), 400, "top_logprobs", None),
    ],
    ids=["malformed-json", "not-an-object", "unknown-model", "repeated-adapter", "negative-max-tokens", "absurd-max-tokens",
         "over-long-prompt", "weight-outside-model", "weight-not-number", "weight-nan", "alpha-infinite", "negative-temperature",
         "no-messages", "too-many-choices", "top-logprobs-without-logprobs", "too-many-top-logprobs"],
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


# ---------------------------------------------------------------------------------------------
# What the server implements of OpenAI's fields, and what it refuses


SAMPLED = dict(model="a+b", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, extra_body={"min_tokens": 8})


def test_seeded_requests_repeat_alone_and_in_a_busy_batch(client):
    """The same seed gives the same text; other seeds give other texts; and a seeded request draws the same tokens when
    it joins a batch that others are decoding (each seeded choice draws from its own generator)."""
    alone = client.completions.create(**SAMPLED, seed=1234).choices[0].text
    assert client.completions.create(**SAMPLED, seed=1234).choices[0].text == alone
    others = {client.completions.create(**SAMPLED, seed=seed).choices[0].text for seed in (1, 2, 3)}
    assert len(others | {alone}) > 1  # 8 tokens at temperature 1 on a random model: equal texts for 4 seeds are near-impossible

    def busy(i: int) -> str:  # unseeded sampling, long enough to still run when the seeded request joins
        stream = client.completions.create(model=["a", "b"][i], prompt=PROMPTS[i + 1], max_tokens=60, temperature=1.0, stream=True,
                                           extra_body={"min_tokens": 60})
        chunks = iter(stream)
        started.append(next(chunks))
        return "".join(c.choices[0].text for c in chunks)

    started: list = []
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(busy, i) for i in range(2)]
        deadline = time.monotonic() + 30
        while len(started) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(started) == 2
        crowded = client.completions.create(**SAMPLED, seed=1234).choices[0].text
        assert not any(run.done() for run in runs)  # they were running all along
        [run.result() for run in runs]
    assert crowded == alone


def test_n_choices_each_with_its_index_and_derived_seed(client):
    """n choices, indexed; under a seed, choice i is the single choice of seed + i; a list of prompts gives n choices per
    prompt in order (greedy: each equals its prompt alone); streamed choices add up to the same; prompts are counted once."""
    chat = dict(model="a", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=6, temperature=1.0, extra_body={"min_tokens": 6})
    three = client.chat.completions.create(**chat, n=3, seed=7)
    assert [c.index for c in three.choices] == [0, 1, 2]
    singles = [client.chat.completions.create(**chat, seed=7 + i) for i in range(3)]
    assert [c.message.content for c in three.choices] == [s.choices[0].message.content for s in singles]
    assert three.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert three.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(**chat, n=3, seed=7, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [c.message.content for c in three.choices]

    prompts = [PROMPTS[3], PROMPTS[4]]
    both = client.completions.create(model="b", prompt=prompts, n=2, max_tokens=5, temperature=0)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    each = [client.completions.create(model="b", prompt=p, max_tokens=5, temperature=0).choices[0].text for p in prompts]
    assert [c.text for c in both.choices] == [each[0], each[0], each[1], each[1]]


def test_top_k_one_is_greedy(client):
    """top_k 1 leaves the sampler one token: at temperature 1 the answer is the greedy one."""
    greedy = client.completions.create(model="a+b", prompt=PROMPTS[6], max_tokens=8, temperature=0).choices[0].text
    top1 = client.completions.create(model="a+b", prompt=PROMPTS[6], max_tokens=8, temperature=1.0, extra_body={"top_k": 1})
    assert top1.choices[0].text == greedy


def test_logprobs_are_the_customized_policys(qmodel, float32):
    """Greedy with logprobs: each token's log-probability and its 3 alternatives are the log-softmax of the customized
    policy's logits computed plainly (full forwards, the dial's formula), before the EOS bar of min_tokens; in the chat and
    the completion shapes, streamed or not."""
    dial = dict(adapter_weights={"b": 0.5}, alpha_0=0.7, alpha_tilde=1.3)
    with running(create_app(qmodel)) as port:  # float32: the reference is computed in it
        local = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        reply = local.chat.completions.create(
            model="a+b", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
            extra_body=dict(dial, min_tokens=6),
        )
        streamed = local.chat.completions.create(
            model="a+b", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
            stream=True, extra_body=dict(dial, min_tokens=6),
        )
        streamed_content = [token for chunk in streamed for token in (chunk.choices[0].logprobs.content if chunk.choices else [])]
        text = local.completions.create(model="a+b", prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=3, extra_body=dict(dial, min_tokens=6))
    tokenizer, eos = qmodel.tokenizer, eos_ids(qmodel)
    content = reply.choices[0].logprobs.content
    assert len(content) == 6 and streamed_content == content

    def expected(ids: list[int]) -> list[tuple[str, float, list[tuple[str, float]]]]:
        out = []
        for _ in range(6):
            logprobs = reference_logits(qmodel, ids, Dial(0.7, 1.3, {"a": 1.0, "b": 0.5}))[0].log_softmax(-1)
            chosen = int(logprobs.index_fill(0, torch.tensor(eos), float("-inf")).argmax())  # min_tokens bars EOS from the choice only
            top = logprobs.topk(3)
            out.append((tokenizer.decode([chosen]), float(logprobs[chosen]), [(tokenizer.decode([i]), float(v)) for v, i in zip(top.values, top.indices.tolist())]))
            ids = ids + [chosen]
        return out

    served = [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]) for t in content]
    for got, want in zip(served, expected(token_rows(tokenizer, [[{"role": "user", "content": PROMPTS[1]}]])[0]), strict=True):
        assert got[0] == want[0] and got[1] == pytest.approx(want[1], abs=1e-4)
        assert [a for a, _ in got[2]] == [a for a, _ in want[2]] and [v for _, v in got[2]] == pytest.approx([v for _, v in want[2]], abs=1e-4)
    assert content[0].bytes == list(content[0].token.encode())
    legacy = text.choices[0].logprobs
    for (token, logprob, top), got_token, got_logprob, got_top in zip(
        expected(token_rows(tokenizer, [PROMPTS[1]], chat=False)[0]), legacy.tokens, legacy.token_logprobs, legacy.top_logprobs, strict=True
    ):
        assert got_token == token and got_logprob == pytest.approx(logprob, abs=1e-4)
        assert list(got_top) == [t for t, _ in top] and list(got_top.values()) == pytest.approx([v for _, v in top], abs=1e-4)
    assert legacy.text_offset[0] == 0 and legacy.text_offset[1] == len(legacy.tokens[0])


@pytest.mark.parametrize(
    "field,value,param",
    [("presence_penalty", 0.5, "presence_penalty"), ("frequency_penalty", -1, "frequency_penalty"), ("logit_bias", {"5": 10}, "logit_bias"),
     ("response_format", {"type": "json_object"}, "response_format"), ("tools", [{"type": "function", "function": {"name": "f"}}], "tools"),
     ("tool_choice", "auto", "tool_choice"), ("service_tier", "auto", "service_tier"), ("stream_options", {"include_obfuscation": True}, "stream_options"),
     ("messages", [{"role": "user", "content": "hi", "name": "bob"}], "messages"), ("no_such_field", 1, "no_such_field")],
    ids=["presence-penalty", "frequency-penalty", "logit-bias", "json-mode", "tools", "tool-choice", "unknown-openai-field",
         "unknown-stream-option", "message-name", "unknown-field"],
)
def test_unimplemented_fields_are_refused_by_name(server, field, value, param):
    """A field the server does not implement is a 400 naming it, not an answer that ignored it."""
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    status, data = _post(server[1], "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and data["error"]["param"] == param, data
    assert field in data["error"]["message"] and "not implemented" in data["error"]["message"]


def test_fields_at_values_that_change_nothing_are_accepted(client):
    """OpenAI's defaults of the unimplemented fields change nothing, so the official client may send them."""
    kwargs = dict(model="a", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=6, temperature=0)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    same = client.chat.completions.create(
        **kwargs, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, response_format={"type": "text"}, user="someone",
        extra_body={"tools": [], "tool_choice": "none"},
    )
    assert same.choices[0].message.content == plain


# ---------------------------------------------------------------------------------------------
# Operations


def _metrics(port: int) -> dict[str, float]:
    """/metrics as {'name{labels}': value}, checking the text format's shape on the way."""
    status, kind, text = _get(port, "/metrics")
    assert status == 200 and kind.startswith("text/plain; version=0.0.4")
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP \w+ .+|TYPE \w+ (counter|gauge|histogram))", line), line
            continue
        name, value = line.rsplit(" ", 1)
        assert re.fullmatch(r'\w+(\{(\w+="[^"]*",?)+\})?', name), line
        samples[name] = float(value)
    return samples


def _wait_for(check, timeout: float = 10.0) -> None:
    """The middleware records a request once its last byte is out, which the client may see first."""
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert check()


def test_health_version_and_metrics(server, client):
    """/health is 200 while the worker runs; /version names qadapter's and its libraries' versions; /metrics counts
    requests by status, prompt and generated tokens and latency, and shows no sequence waiting or running when idle."""
    port = server[1]
    status, _, text = _get(port, "/health")
    assert status == 200 and json.loads(text) == {"status": "ok"}
    status, _, text = _get(port, "/version")
    version = json.loads(text)
    assert status == 200 and version["version"] == qadapter.__version__ and version["versions"]["torch"] == torch.__version__
    ok, bad = 'qadapter_requests_total{route="/v1/completions",status="200"}', 'qadapter_requests_total{route="/v1/completions",status="400"}'
    latency = 'qadapter_request_duration_seconds_count{route="/v1/completions"}'
    before = _metrics(port)
    reply = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=5, temperature=0, n=2)
    assert _post(port, "/v1/completions", json.dumps({"model": "a", "prompt": "hi", "echo": True}).encode())[0] == 400
    _wait_for(lambda: _metrics(port).get(bad, 0) == before.get(bad, 0) + 1 and _metrics(port)[ok] == before.get(ok, 0) + 1)
    after = _metrics(port)
    assert after[latency] == before.get(latency, 0) + 1
    assert after['qadapter_request_duration_seconds_bucket{route="/v1/completions",le="+Inf"}'] == after[latency]
    assert after["qadapter_generation_tokens_total"] - before["qadapter_generation_tokens_total"] == reply.usage.completion_tokens
    assert after["qadapter_prompt_tokens_total"] - before["qadapter_prompt_tokens_total"] == 2 * reply.usage.prompt_tokens  # prefilled per choice
    assert after["qadapter_sequences_waiting"] == 0 and after["qadapter_sequences_running"] == 0
