"""The server's limits against abusive clients (SECURITY.md, "Server"), on a tiny model behind a real uvicorn on loopback:
body size, read timeouts (raw sockets), stop strings, numeric ranges, the API key and the bind check."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from typer.testing import CliRunner  # noqa: E402

from qadapter.cli import app as cli_app  # noqa: E402
from qadapter.config import ServeLimits  # noqa: E402
from qadapter.errors import ConfigError  # noqa: E402
from qadapter.model import QAdapterModel  # noqa: E402
from qadapter.serve import MAX_CHARS_PER_TOKEN, StopMatcher, check_bind, create_app, server_config  # noqa: E402

from conftest import running, random_adapter  # noqa: E402

KEY = "test-key-7f3a"
LIMITS = ServeLimits(max_request_bytes=64 * 1024, read_timeout=1.0, max_stop_chars=32)
SLACK_S = 3.0  # on top of read_timeout before a connection must have been closed (a loaded 2-core machine)


@pytest.fixture(scope="module")
def qmodel(tiny_model_dir, tmp_path_factory):
    return QAdapterModel.from_pretrained({"a": random_adapter(tiny_model_dir, tmp_path_factory.mktemp("security") / "a", "residual", 1)}, device="cpu")


@pytest.fixture(scope="module")
def port(qmodel):
    with running(create_app(qmodel, limits=LIMITS, api_key=KEY)) as p:
        yield p


AUTH = b"Authorization: Bearer " + KEY.encode()
CHAT = {"model": "a", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _head(method: str, path: str, *lines: bytes) -> bytes:
    return b"\r\n".join([f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", *lines, b"", b""])


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket timeout fails the test)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _response(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _post(port: int, body: bytes, *headers: bytes, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    with _connect(port) as sock:
        sock.sendall(_head("POST", path, AUTH, b"Content-Type: application/json", b"Connection: close", f"Content-Length: {len(body)}".encode(), *headers) + body)
        return _response(_until_closed(sock))


def _assert_openai_error(status: int, data: dict, expected: int, param: str | None = None) -> None:
    assert status == expected, data
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["message"]
    assert data["error"]["param"] == param


# ---------------------------------------------------------------------------------------------
# Request size


def test_declared_oversize_body_is_refused_before_it_is_read(port):
    """A Content-Length over the limit gets 413 at once, with 1 KiB of a declared 100 MB sent (not after the read timeout)."""
    with _connect(port) as sock:
        sock.sendall(_head("POST", "/v1/chat/completions", AUTH, b"Content-Type: application/json", b"Content-Length: 100000000") + b"x" * 1024)
        _assert_openai_error(*_response(_until_closed(sock)), 413)


def test_chunked_oversize_body_is_counted(port):
    """A chunked body (no Content-Length) is counted as it arrives: one byte past the limit gets 413."""
    chunk = b"x" * 16 * 1024
    with _connect(port) as sock:
        sock.sendall(_head("POST", "/v1/chat/completions", AUTH, b"Content-Type: application/json", b"Transfer-Encoding: chunked"))
        for piece in [chunk] * (LIMITS.max_request_bytes // len(chunk)) + [b"x"]:
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        _assert_openai_error(*_response(_until_closed(sock)), 413)


def test_body_at_the_limit_is_read_and_an_over_long_prompt_refused(port):
    """A body of exactly the limit is parsed; its prompt, far over the context, gets 400 context_length_exceeded."""
    body = dict(CHAT, messages=[{"role": "user", "content": ""}])
    filler = LIMITS.max_request_bytes - len(json.dumps(body).encode())
    body["messages"][0]["content"] = ("the cat " * filler)[:filler]
    raw = json.dumps(body).encode()
    assert len(raw) == LIMITS.max_request_bytes
    status, data = _post(port, raw)
    _assert_openai_error(status, data, 400, "messages")
    assert data["error"]["code"] == "context_length_exceeded"


def test_prompt_too_long_in_characters_is_refused_before_tokenizing(port):
    """A prompt of more characters than the context holds at MAX_CHARS_PER_TOKEN each is refused, even one that
    would be few tokens (one unknown word: a single token here), so tokenizing work follows the context."""
    word = "x" * (256 * MAX_CHARS_PER_TOKEN + 1)  # the tiny model holds 256 tokens
    for path, body in (("/v1/chat/completions", dict(CHAT, messages=[{"role": "user", "content": word}])),
                       ("/v1/completions", {"model": "a", "prompt": word, "max_tokens": 4})):
        status, data = _post(port, json.dumps(body).encode(), path=path)
        _assert_openai_error(status, data, 400, "messages" if "messages" in body else "prompt")
        assert data["error"]["code"] == "context_length_exceeded" and "characters" in data["error"]["message"]


# ---------------------------------------------------------------------------------------------
# Read timeouts (raw sockets)


def _closed_within(sock: socket.socket, limit_s: float) -> float:
    """Seconds until the server closed ``sock`` (nothing more may arrive first); fails past ``limit_s``."""
    sock.settimeout(limit_s)
    started = time.monotonic()
    assert sock.recv(1024) == b""
    return time.monotonic() - started


def test_silent_and_stalled_heads_are_closed(port):
    """A connection that sends nothing, or half a head, is closed by the server after the read timeout."""
    silent, stalled = _connect(port), _connect(port)
    with silent, stalled:
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        _closed_within(silent, LIMITS.read_timeout + SLACK_S)
        _closed_within(stalled, LIMITS.read_timeout + SLACK_S)


def test_trickled_head_is_closed_at_the_deadline(port):
    """A head sent a byte at a time (each byte would restart an idle timer) is cut at the deadline, on a fresh
    connection and on a kept-alive one after its first response."""
    with _connect(port) as fresh, _connect(port) as reused:
        reused.sendall(_head("GET", "/v1/models", AUTH))
        assert reused.recv(65536).startswith(b"HTTP/1.1 200")
        for sock in (fresh, reused):
            sock.settimeout(0.1)
        started, closed = time.monotonic(), set()
        for byte in b"GET /v1/models HTTP/1.1\r\n" + b"X-Pad: y\r\n" * 1000:  # a head that never ends
            for sock in (fresh, reused):
                if sock in closed:
                    continue
                try:
                    sock.sendall(bytes([byte]))
                    if sock.recv(1024) == b"":
                        closed.add(sock)
                except TimeoutError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    closed.add(sock)
            if len(closed) == 2 or time.monotonic() - started > LIMITS.read_timeout + SLACK_S:
                break
        assert closed == {fresh, reused}


def test_oversize_head_is_refused(port):
    """A head still incomplete past h11's 16 KiB gets 400 and the connection closes, long before the read timeout."""
    with _connect(port) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ")
        for _ in range(17):  # 1 KiB at a time, so that each arrives on its own
            sock.sendall(b"y" * 1024)
            time.sleep(0.02)
        assert _until_closed(sock).startswith(b"HTTP/1.1 400")


def test_stalled_body_gets_408(port):
    """A head that promises 100 bytes of body and sends 10 gets 408 after the read timeout, then the connection closes."""
    with _connect(port) as sock:
        sock.sendall(_head("POST", "/v1/chat/completions", AUTH, b"Content-Type: application/json", b"Content-Length: 100") + b'{"model": ')
        _assert_openai_error(*_response(_until_closed(sock)), 408)


# ---------------------------------------------------------------------------------------------
# Stop strings


@pytest.mark.parametrize(
    "stop,message",
    [(["the"] * 5, "at most 4 stop sequences"), ("x" * (LIMITS.max_stop_chars + 1), f"at most {LIMITS.max_stop_chars} characters"),
     (["ok", "y" * 1000], f"at most {LIMITS.max_stop_chars} characters")],
    ids=["five", "one-too-long", "huge-in-list"],
)
def test_stop_strings_are_bounded(port, stop, message):
    status, data = _post(port, json.dumps(dict(CHAT, stop=stop)).encode())
    _assert_openai_error(status, data, 400, "stop")
    assert message in data["error"]["message"]


def _reference(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    """The server's former matching, quadratic but plainly right: after each piece, the earliest stop in all the text so far."""
    text = ""
    for piece in pieces:
        text += piece
        found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        if found:
            return text[: min(found)], True
    return text, False


def _run(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = ""
    for piece in pieces:
        released, stopped = matcher.feed(piece)
        out += released
        if stopped:
            return out, True
    return out + matcher.flush(), False


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("ab ", max_size=6), max_size=12), st.lists(st.text("ab ", max_size=5), max_size=4))
def test_stop_matcher_equals_the_plain_search(pieces, stops):
    """On text from a small alphabet (many overlapping, split and repeated stops), pieces fed one by one stop exactly
    where a search of the whole text would, and released text never ends in what may begin a stop string."""
    matcher = StopMatcher(stops)
    assert _run(matcher, pieces) == _reference(pieces, stops)
    released = ""
    matcher = StopMatcher(stops)
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        released += text
        if stopped:
            break
        text = released + matcher.held
        assert not any(s and s in text for s in stops)
        # held back: exactly the longest end of the text that begins a stop string
        assert len(matcher.held) == max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def test_stop_string_split_over_tokens_ends_the_text(port, qmodel):
    """A stop string that spans two tokens ("...t s..." across "cat" and "sat") ends the answer, streamed or not."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
    ask = dict(model="a", prompt="where is the red mat", max_tokens=12, temperature=0, extra_body={"min_tokens": 12})
    full = client.completions.create(**ask).choices[0].text
    words = full.split()
    assert len(words) >= 3
    at = full.index(" " + words[2])  # the boundary between the second and third word
    stop = full[at - 1 : at + 3]  # the last letter of one token, the space, two letters of the next
    cut = client.completions.create(**ask, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**ask, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


class _CountingStr(str):
    """A str that counts how often a character of it is looked at."""

    reads = 0

    def __getitem__(self, index):
        _CountingStr.reads += 1
        return super().__getitem__(index)


def test_stop_matcher_work_is_linear():
    """The characters of the stop strings looked at grow linearly with the text, however long the stop strings (the
    issue's 4 of 300k characters), on the worst case of a plain search: text that nearly matches them all for long."""
    stops = [_CountingStr("a" * 99_999 + end) for end in "bcde"]
    text = "a" * 30_000 + "b"
    matcher = StopMatcher(stops)
    _CountingStr.reads = 0  # from here on: matching only
    released = ""
    for i in range(0, len(text), 3):
        piece, stopped = matcher.feed(text[i : i + 3])
        released += piece
        assert not stopped
    assert released == text and matcher.held == ""  # the a's could begin a stop string until the b
    # KMP: two reads per character and stop string, plus one per fall back, and it falls back at most once per character
    assert _CountingStr.reads <= 3 * len(stops) * len(text)


def test_stop_matcher_with_max_length_stops_on_long_text():
    """4 stop strings of the maximum length; 100k characters of random text, then one of them, in random pieces."""
    rng = random.Random(0)
    stops = ["".join(rng.choice("ab") for _ in range(256)) for _ in range(4)]
    text = "".join(rng.choice("abc") for _ in range(100_000)) + "c" + stops[2] + "tail"
    cuts = sorted({0, len(text), *rng.sample(range(len(text)), 30_000)})
    pieces = [text[i:j] for i, j in zip(cuts, cuts[1:])]
    expected = (text[: min(i for i in (text.find(s) for s in stops) if i >= 0)], True)  # the only occurrence
    matcher = StopMatcher(stops)
    out = ""
    for piece in pieces:
        released, stopped = matcher.feed(piece)
        out += released
        assert len(matcher.held) < 256
        if stopped:
            break
    assert (out, stopped) == expected and stopped and out.endswith("c")


# ---------------------------------------------------------------------------------------------
# Numeric fields


@pytest.mark.parametrize(
    "field,value",
    [("alpha_0", 1e300), ("alpha_tilde", 1e-300), ("alpha_tilde", 1e300), ("temperature", 1e-300), ("adapter_weights", {"a": 1e300}),
     ("adapter_weights", {"a": -1e300})],
    ids=["alpha0-huge", "alpha-tilde-tiny", "alpha-tilde-huge", "temperature-tiny", "weight-huge", "weight-hugely-negative"],
)
def test_numbers_out_of_range_name_the_field(port, field, value):
    """Values that would overflow the logits (and returned 200 with empty text) get 400 naming the field."""
    status, data = _post(port, json.dumps(dict(CHAT, **{field: value})).encode())
    _assert_openai_error(status, data, 400, field)


def test_extreme_allowed_numbers_keep_the_logits_finite(port):
    """At the edges of every range the answer is still real text of the requested length."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
    for sign in (1, -1):
        reply = client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "hello there"}], max_tokens=6, temperature=0.01, top_p=0.5,
            extra_body={"alpha_0": 1e3, "alpha_tilde": 1e-3, "adapter_weights": {"a": sign * 1e3}, "min_tokens": 6},
        )
        assert len(reply.choices[0].message.content.split()) == 6


# ---------------------------------------------------------------------------------------------
# Access


def test_api_key_is_required(port):
    """No key or a wrong one: 401 invalid_api_key with WWW-Authenticate, on every endpoint; the right one: 200, with the official client too."""
    for auth in (None, b"Authorization: Bearer wrong", b"Authorization: Basic " + KEY.encode(), b"Authorization: Bearer"):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            with _connect(port) as sock:
                body = json.dumps(CHAT).encode() if method == "POST" else b""
                lines = [b"Connection: close", f"Content-Length: {len(body)}".encode()] + ([auth] if auth else [])
                sock.sendall(_head(method, path, *lines) + body)
                raw = _until_closed(sock)
            _assert_openai_error(*_response(raw), 401)
            assert b"www-authenticate: bearer" in raw.lower()
            assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
    assert [m.id for m in right.models.list()] == ["base", "a"]
    assert right.chat.completions.create(**CHAT).choices[0].finish_reason in ("stop", "length")


def test_health_is_open_and_metrics_and_version_need_the_key(port):
    """/health answers without the key (a load balancer's probe carries none); /metrics and /version tell about the traffic
    and the installation, so they need it like the API."""
    for path, open_ in (("/health", True), ("/metrics", False), ("/version", False)):
        for auth in ([], [AUTH]):
            with _connect(port) as sock:
                sock.sendall(_head("GET", path, b"Connection: close", *auth))
                raw = _until_closed(sock)
            assert int(raw.split()[1]) == (200 if auth or open_ else 401), (path, raw[:200])


def test_binding_beyond_loopback_needs_a_key_or_insecure():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert check_bind(host, None, False) is False
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        with pytest.raises(ConfigError, match="--api-key"):
            check_bind(host, None, False)
        assert check_bind(host, "k", False) is False
        assert check_bind(host, None, True) is True  # served, with a warning


def test_cli_refuses_a_public_bind_without_a_key_before_loading(tmp_path):
    """One line, exit 2, before the (here missing) adapter is even looked at; QADAPTER_API_KEY counts as a key."""
    env = {k: v for k, v in os.environ.items() if k not in ("QADAPTER_API_KEY", "QADAPTER_DEBUG")}
    missing = str(tmp_path / "missing")
    proc = subprocess.run([sys.executable, "-m", "qadapter", "serve", "--host", "0.0.0.0", "--adapter", missing],
                          capture_output=True, text=True, env=dict(env, COLUMNS="300"), timeout=120)
    assert proc.returncode == 2 and "--api-key" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    with_key = CliRunner().invoke(cli_app, ["serve", "--host", "0.0.0.0", "--adapter", missing], env={"QADAPTER_API_KEY": "k"})
    assert "qadapter_config.json" in str(with_key.exception)  # got past the bind check, to loading
