"""The server's HTTP side: an OpenAI-compatible FastAPI app for the customized policy.

    qadapter serve --adapter a=runs/a --adapter b=runs/b        # http://127.0.0.1:8000/v1

Model ids: ``base`` (the base model as it is; the dial does not apply), each adapter's name, and
``+``-joined combinations such as ``a+b`` (weight 1 each). Besides the OpenAI fields
(``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``stream``, ``n``, ``seed``, ``logprobs``),
a request may carry ``alpha_0`` and ``alpha_tilde`` (the forgetting dial), ``adapter_weights`` (w_i
of the model's adapters), ``min_tokens`` and ``top_k`` (as in vLLM). Any other field is refused with
a 400 naming it, except OpenAI's at a value that changes nothing (:mod:`~qadapter.serve.schema`).
Besides ``/v1``: ``/health``, ``/version`` and ``/metrics`` (Prometheus).

One worker thread owns the model (:class:`Scheduler`) and decodes all running requests as one
:class:`~qadapter.decode.DecodeBatch`: a request adds one row per adapter of its model, plus a base
row unless the base logits cancel, to ONE forward per step. Finished and disconnected requests leave
between steps; waiting requests join between steps, oldest first. A request of n choices (or of
several prompts) is one sequence per choice. The event loop only validates, queues and streams, so
it stays responsive while the worker computes.

Every client is bounded (:class:`~qadapter.config.ServeLimits`, SECURITY.md): the body's size and
the time to send the head and the body, the number and length of stop strings (matched in time
linear in the text, :class:`StopMatcher`), every numeric field, and the prompt by the context. With
``api_key`` every request but ``/health`` needs ``Authorization: Bearer KEY``; without one, only
loopback is served unless the caller insists (:func:`check_bind`).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hmac
import ipaddress
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import h11
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import environment
from ..config import Dial, ServeLimits
from ..decode import Mixture, StopMatcher, Stream, mixture, token_rows
from ..errors import ConfigError
from ..sampling import Sampling
from .metrics import CONTENT_TYPE, RequestMetrics, RequestStats, exposition
from .scheduler import Event, Job, Scheduler, Scored
from .schema import MAX_CHOICES, APIError, ChatBody, CompletionBody, _Body

log = logging.getLogger("qadapter.serve")
DEFAULT_MAX_TOKENS = 256  # when a request names none (capped by the room its prompt leaves)
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there
# A prompt longer than this many characters per token of the context is refused before it is tokenized: natural text
# has about 4, and tokenizing costs about a second per MB, so the tokenizer's work per request follows the context,
# not the body limit.
MAX_CHARS_PER_TOKEN = 32
OPEN_PATHS = frozenset({"/health"})  # answered without the API key: a load balancer's probe carries none, and it tells nothing


# ---------------------------------------------------------------------------------------------
# Limits and access, enforced before a request reaches its route


def _too_large(limit: int) -> str:
    return f"the request body exceeds this server's limit of {limit} bytes"


class BodyLimits:
    """ASGI middleware that bounds each request body in size and in time before anything parses it.

    A declared Content-Length over ``max_bytes`` is answered 413 without reading the body; a body
    without one (chunked) is counted as it arrives; the whole body must arrive within ``timeout``
    seconds of its request head, else 408. A response that starts before the body is in (these, a
    401, a 404) closes the connection, so what is left of the body is never read. (FastAPI's own
    ``max_body_size`` answers a declared oversize body in plain text, not with OpenAI's error body.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _LimitedBody(Headers(scope=scope), receive, send, self.max_bytes, self.timeout)
        if body.declared > self.max_bytes:
            await APIError(413, _too_large(self.max_bytes)).response()(scope, body.receive, body.send)
        else:
            await self.app(scope, body.receive, body.send)


class _LimitedBody:
    """One request's body under :class:`BodyLimits`: the ``receive`` and ``send`` its app gets."""

    def __init__(self, headers: Headers, receive: Receive, send: Send, max_bytes: int, timeout: float) -> None:
        declared = headers.get("content-length", "")
        self.declared = int(declared) if declared.isdigit() else 0  # h11 has already refused malformed values
        self.pending = self.declared > 0 or "transfer-encoding" in headers  # body bytes may still be on their way
        self.received = 0
        self.deadline = time.monotonic() + timeout
        self._receive, self._send, self.max_bytes, self.timeout = receive, send, max_bytes, timeout

    async def receive(self) -> Message:
        """The next message; while the body is incomplete, 413 past ``max_bytes`` and 408 past the deadline (raised
        as HTTPException, which FastAPI's body parsing passes on to the app's handler: OpenAI's error body)."""
        if not self.pending:
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), self.deadline - time.monotonic())
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the request body did not arrive within {self.timeout:g} s") from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_bytes:
                raise HTTPException(413, _too_large(self.max_bytes))
            self.pending = message.get("more_body", False)
        else:  # http.disconnect
            self.pending = False
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and self.pending:
            # answered before the body is in: close the connection rather than let the server read the rest
            message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await self._send(message)


class APIKey(AuthenticationBackend):
    """Every request but those to :data:`OPEN_PATHS` must carry ``Authorization: Bearer <key>``, compared in constant time."""

    def __init__(self, key: str) -> None:
        self.key = key.encode()

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        if conn.url.path in OPEN_PATHS:
            return None  # Starlette's unauthenticated user; no route asks for more
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        # Starlette decodes headers as latin-1, so encoding back gives the bytes the client sent
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
            raise AuthenticationError("missing or wrong API key: send the header 'Authorization: Bearer <key>'")
        return AuthCredentials(["authenticated"]), SimpleUser("client")


def _unauthorized(conn: HTTPConnection, exc: AuthenticationError) -> JSONResponse:
    response = APIError(401, str(exc), code="invalid_api_key").response()
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def header_deadline_protocol(timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for every request head: ``timeout`` seconds from the
    connection, or from the previous response, to the end of the headers; then the connection is
    closed. uvicorn has no such limit (its keep-alive timer stops at the first byte), so a client
    that trickles its headers, or sends none, would hold its connection for ever. (h11 bounds the
    head's size, 16 KiB.) It extends the protocol's asyncio callbacks and uvicorn's
    ``on_response_complete``, and reads only h11's connection state; served with ``http=`` of
    ``uvicorn.Config``, uvicorn's documented way to choose the protocol class."""

    class HeaderDeadlineProtocol(H11Protocol):
        head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is in
                self._cancel()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_head()  # of the next request on this connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            if self.head_deadline is None and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.head_deadline = self.loop.call_later(timeout, self.transport.close)

        def _cancel(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None

    return HeaderDeadlineProtocol


def is_loopback(host: str) -> bool:
    """Whether ``host`` answers this machine only; a name other than localhost may resolve anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool) -> bool:
    """Refuse to answer other machines without an API key unless ``insecure``; returns whether it will anyway."""
    if api_key or is_loopback(host):
        return False
    if not insecure:
        raise ConfigError(f"--host {host} answers other machines: give --api-key (or QADAPTER_API_KEY), or --insecure to serve without one")
    return True


# ---------------------------------------------------------------------------------------------
# The HTTP API


def context_window(qmodel: Any) -> int:
    """Tokens one sequence may hold: the model's position limit (its tokenizer's where the config has none)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(qmodel.peft_model.config, key, None)
        if isinstance(value, int):
            return value
    return int(qmodel.tokenizer.model_max_length)


def model_ids(qmodel: Any) -> list[str]:
    """``base``, then every combination of adapters in load order: ``a``, ``b``, ``a+b``, ..."""
    names = list(qmodel.adapters)
    return ["base"] + ["+".join(c) for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]


def request_mixture(qmodel: Any, body: _Body) -> Mixture:
    """The policy a request asks for: its model's adapters (weight 1, or ``adapter_weights``) at its dial."""
    if body.model == "base":
        if body.adapter_weights:
            raise APIError(400, "model 'base' has no adapters to weigh", param="adapter_weights")
        return mixture(qmodel, policy="base")
    names = body.model.split("+")
    if len(set(names)) != len(names) or not set(names) <= set(qmodel.adapters):
        raise APIError(404, f"model {body.model!r} does not exist; see /v1/models", param="model", code="model_not_found")
    given = body.adapter_weights or {}
    outside = sorted(set(given) - set(names))
    if outside:
        raise APIError(400, f"adapter_weights names {', '.join(outside)}, which model {body.model!r} does not include", param="adapter_weights")
    weights = {name: (given.get(name, 1.0) if name in names else 0.0) for name in qmodel.adapters}
    try:
        return mixture(qmodel, Dial(body.alpha_0, body.alpha_tilde, weights))
    except ConfigError as exc:
        raise APIError(400, str(exc), param="adapter_weights" if str(exc).startswith("weights") else None) from None


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _generator(device: Any, seed: int | None, index: int) -> torch.Generator | None:
    """Choice ``index``'s own generator under a request's ``seed`` (seed + index, as vLLM's choices); None without a seed."""
    return None if seed is None else torch.Generator(device=device).manual_seed((seed + index) % 2**64)


def _usage(prompts: list[list[int]], jobs: list[Job]) -> dict[str, int]:
    """Tokens of each prompt once (however many choices it has), and of every choice."""
    prompt, done = sum(map(len, prompts)), sum(len(job.stream.tokens) for job in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _chat_logprobs(scored: list[Scored]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: per token its text, log-probability, UTF-8 bytes and alternatives."""
    return {"content": [_token(s.token, s.logprob) | {"top_logprobs": [_token(t, lp) for t, lp in s.top]} for s in scored], "refusal": None}


def _completion_logprobs(scored: list[Scored], offset: int) -> dict[str, Any]:
    """OpenAI's legacy completion ``logprobs``; ``text_offset`` counts from ``offset``, the characters of the
    choice's tokens before these (as vLLM, from the tokens' own texts)."""
    offsets = list(itertools.accumulate((len(s.token) for s in scored[:-1]), initial=offset)) if scored else []
    return {
        "tokens": [s.token for s in scored],
        "token_logprobs": [s.logprob for s in scored],
        "top_logprobs": [dict(s.top) for s in scored],
        "text_offset": offsets,
    }


def _choice(
    chat: bool, index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None, stream: bool, first: bool = False
) -> dict[str, Any]:
    if not chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    if not stream:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish}
    delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


async def _events(jobs: list[Job], request: Request | None) -> AsyncIterator[Event]:
    """A request's events (its jobs share one queue) until every job has ended or one fails. A client that goes
    away cancels the jobs, which leave the batch at the next step: a stream's disconnect cancels this generator
    (Starlette listens for it), and a waiting non-streaming request polls ``request``."""
    events, running = jobs[0].events, len(jobs)
    try:
        while running:
            if request is None:
                event = await events.get()
            else:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
            yield event
            if event.error:
                return
            running -= event.finish is not None
    finally:
        for job in jobs:
            job.cancelled = True


def create_app(
    qmodel: Any, *, max_batch_size: int = 32, max_queue: int = 256, limits: ServeLimits = ServeLimits(), api_key: str | None = None
) -> FastAPI:
    """The FastAPI app serving ``qmodel`` (one adapter or a composition); its worker runs while the app does.
    Serve it with :func:`server_config`, which adds the request-head deadline."""
    scheduler = Scheduler(qmodel, max_batch_size, max_queue)
    window = context_window(qmodel)
    created = int(time.time())
    stats = RequestStats()
    recorded = environment.record()
    version = {"version": recorded["versions"]["qadapter"], "versions": recorded["versions"], "git": recorded["git"]}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="qadapter", lifespan=lifespan)
    app.state.scheduler, app.state.limits = scheduler, limits
    if api_key:  # before any body is read
        app.add_middleware(AuthenticationMiddleware, backend=APIKey(api_key), on_error=_unauthorized)
    app.add_middleware(BodyLimits, max_bytes=limits.max_request_bytes, timeout=limits.read_timeout)
    app.add_middleware(RequestMetrics, stats=stats)  # outermost: sees every response, 413s and 401s too

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        where = [str(part) for part in error.get("loc", ()) if part != "body"]
        if error.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})").response()
        if error.get("type") == "extra_forbidden":
            message = "not implemented by this server (it refuses what it would otherwise ignore)"
        elif error.get("type") == "value_error":
            message = str(error["ctx"]["error"])  # without pydantic's "Value error, " in front
        else:
            message = error.get("msg")
        return APIError(400, f"{'.'.join(where) or 'body'}: {message}", param=where[0] if where else None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {exc}", kind="server_error").response()

    def describe(model_id: str) -> dict[str, Any]:
        """As vLLM: ``root`` the checkpoint served, ``parent`` the entry an adapter entry builds on (as a LoRA's)."""
        parent = None if model_id == "base" else "base"
        return {"id": model_id, "object": "model", "created": created, "owned_by": "qadapter", "root": qmodel.identity.name,
                "parent": parent, "max_model_len": window}

    @app.get("/health")
    async def health() -> dict[str, str]:
        if not scheduler.alive:
            raise APIError(503, "the decoding worker is not running", kind="server_error")
        return {"status": "ok"}

    @app.get("/version")
    async def get_version() -> dict[str, Any]:
        return version

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(exposition(stats, scheduler), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [describe(m) for m in model_ids(qmodel)]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id not in model_ids(qmodel):
            raise APIError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")
        return describe(model_id)

    # Each encoding thread has its own copy of the tokenizer, so a long prompt (up to the body limit: seconds of
    # tokenizing) holds up neither the worker's decoding nor other prompts, and no tokenizer is shared across threads.
    encoders = threading.local()

    def encode(prompt: Any, chat: bool) -> list[int]:
        if not hasattr(encoders, "tokenizer"):
            encoders.tokenizer = copy.deepcopy(qmodel.tokenizer)
        try:
            return token_rows(encoders.tokenizer, [prompt], chat)[0]
        except Exception as exc:  # e.g. a chat template that refuses this sequence of roles
            raise APIError(400, f"cannot render the prompt: {exc}", param="messages" if chat else "prompt") from None

    def check_characters(prompts: list[Any], chat: bool) -> None:
        """Refuse prompts that cannot fit without spending seconds tokenizing them: at most MAX_CHARS_PER_TOKEN
        characters per token of the context, for all the prompts of a request together."""
        chars = sum(sum(len(m["content"]) for m in prompt) if chat else len(prompt) for prompt in prompts)
        if chars > window * MAX_CHARS_PER_TOKEN:
            what = "the prompt has" if len(prompts) == 1 else f"the {len(prompts)} prompts have together"
            raise APIError(
                400,
                f"{what} {chars} characters; this model holds {window} tokens, at most {window * MAX_CHARS_PER_TOKEN} characters",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )

    async def tokenized(prompt: Any, chat: bool, max_tokens: int | None, min_tokens: int) -> tuple[list[int], int]:
        """The prompt's token ids and its max_tokens (default: DEFAULT_MAX_TOKENS or the room it leaves), checked against the context."""
        where = "messages" if chat else "prompt"
        ids = await asyncio.to_thread(encode, prompt, chat)
        room = window - len(ids)
        if not ids:
            raise APIError(400, "the prompt is empty", param=where)
        if room < 1:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model holds {window}", param=where, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceed this model's {window} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        max_tokens = max_tokens or min(DEFAULT_MAX_TOKENS, room)
        if min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens")
        return ids, max_tokens

    async def respond(request: Request, body: ChatBody | CompletionBody, prompts: list[Any], chat: bool, max_tokens: int | None) -> Any:
        """Decode ``body.n`` choices of each prompt, choice ``i * n + j`` the j-th of prompt i (as OpenAI)."""
        policy = request_mixture(qmodel, body)
        stops = body.checked_stops(limits.max_stop_chars)
        alternatives = body.alternatives()
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts × n = {body.n} choices; at most {MAX_CHOICES} per request", param="n")
        check_characters(prompts, chat)
        encoded = [await tokenized(prompt, chat, max_tokens, body.min_tokens) for prompt in prompts]
        sampling = Sampling(body.temperature, body.top_p, max(body.top_k, 0))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = []
        for index, (ids, budget) in enumerate(e for e in encoded for _ in range(body.n)):
            generator = _generator(qmodel.device, body.seed, index)
            stream = Stream(policy, sampling, budget, body.min_tokens, StopMatcher(stops), generator=generator, top_logprobs=alternatives)
            jobs.append(Job(ids, stream, loop, events, index))
        scheduler.submit(jobs)
        usage = functools.partial(_usage, [ids for ids, _ in encoded], jobs)  # read once the jobs have ended
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            head["object"] = "chat.completion.chunk" if chat else "text_completion"
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                _stream(jobs, head, chat, alternatives is not None, usage if include_usage else None),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        texts, finishes, scored = [""] * len(jobs), [None] * len(jobs), [[] for _ in jobs]
        async for event in _events(jobs, request):
            if event.error:
                raise APIError(500, event.error, kind="server_error")
            texts[event.index] += event.text
            finishes[event.index] = event.finish
            scored[event.index] += event.logprobs
        head["object"] = "chat.completion" if chat else "text_completion"
        choices = [
            _choice(chat, i, texts[i], finishes[i], None if alternatives is None else _logprobs(chat, scored[i], 0), False) for i in range(len(jobs))
        ]
        return head | {"choices": choices, "usage": usage()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Any:
        messages = [m.as_dict() for m in body.messages]
        return await respond(request, body, [messages], True, body.max_completion_tokens or body.max_tokens)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        return await respond(request, body, prompts, False, body.max_tokens)

    return app


def _logprobs(chat: bool, scored: list[Scored], offset: int) -> dict[str, Any]:
    return _chat_logprobs(scored) if chat else _completion_logprobs(scored, offset)


async def _stream(
    jobs: list[Job], head: dict[str, Any], chat: bool, logprobs: bool, usage: Callable[[], dict[str, int]] | None
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per event of a choice (its piece of text, then its finish reason), the
    usage if asked, then [DONE]."""
    started: set[int] = set()
    offsets = [0] * len(jobs)  # per choice, for the completion logprobs' text_offset
    try:
        async for event in _events(jobs, None):
            if event.error:
                yield _sse({"error": {"message": event.error, "type": "server_error", "param": None, "code": None}})
                break
            scored = _logprobs(chat, event.logprobs, offsets[event.index]) if logprobs else None
            offsets[event.index] += sum(len(s.token) for s in event.logprobs)
            yield _sse(head | {"choices": [_choice(chat, event.index, event.text, event.finish, scored, True, event.index not in started)]})
            started.add(event.index)
        else:
            if usage is not None:
                yield _sse(head | {"choices": [], "usage": usage()})
        yield _sse("[DONE]")
    finally:
        for job in jobs:
            job.cancelled = True  # a client gone mid-stream closes this generator: free the jobs' rows


def server_config(app: FastAPI, **options: Any) -> uvicorn.Config:
    """uvicorn's settings for an app made by :func:`create_app`: its h11 protocol with the head deadline of the app's limits."""
    return uvicorn.Config(app, http=header_deadline_protocol(app.state.limits.read_timeout), **options)


def serve(
    qmodel: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 32,
    max_queue: int = 256,
    limits: ServeLimits = ServeLimits(),
    api_key: str | None = None,
    insecure: bool = False,
) -> None:
    """Serve ``qmodel`` until interrupted: loopback only unless ``host`` says otherwise, and then only with
    ``api_key`` or ``insecure``."""
    if check_bind(host, api_key, insecure):
        log.warning("WARNING: serving %s with no API key (--insecure): anyone who can reach it can use it", host)
    app = create_app(qmodel, max_batch_size=max_batch_size, max_queue=max_queue, limits=limits, api_key=api_key)
    uvicorn.Server(server_config(app, host=host, port=port)).run()
