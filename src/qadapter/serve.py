"""An OpenAI-compatible HTTP server for the customized policy (the only module importing fastapi and uvicorn).

    qadapter serve --adapter a=runs/a --adapter b=runs/b        # http://127.0.0.1:8000/v1

Model ids: ``base`` (the base model as it is; the dial does not apply), each adapter's name, and
``+``-joined combinations such as ``a+b`` (weight 1 each). Besides the OpenAI fields
(``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``stream``), a request may carry ``alpha_0``
and ``alpha_tilde`` (the forgetting dial), ``adapter_weights`` (w_i of the model's adapters) and
``min_tokens`` (as in vLLM).

One worker thread owns the model (:class:`Scheduler`) and decodes all running requests as one
:class:`~qadapter.decode.DecodeBatch`: a request adds one row per adapter of its model, plus a base
row unless the base logits cancel, to ONE forward per step. Finished and disconnected requests leave
between steps; waiting requests join between steps, oldest first. The event loop only validates,
queues and streams, so it stays responsive while the worker computes.

Every client is bounded (:class:`~qadapter.config.ServeLimits`, SECURITY.md): the body's size and
the time to send the head and the body, the number and length of stop strings (matched in time
linear in the text, :class:`StopMatcher`), every numeric field, and the prompt by the context. With
``api_key`` every request needs ``Authorization: Bearer KEY``; without one, only loopback is served
unless the caller insists (:func:`check_bind`).
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import ipaddress
import itertools
import json
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import h11
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .collate import pad_rows
from .config import Dial, ServeLimits
from .decode import DecodeBatch, Mixture, eos_ids, mixture, token_rows
from .errors import ConfigError
from .sampling import sample_next

log = logging.getLogger("qadapter.serve")
DEFAULT_MAX_TOKENS = 256  # when a request names none (capped by the room its prompt leaves)
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there
MAX_STOPS = 4  # as OpenAI
# A prompt longer than this many characters per token of the context is refused before it is tokenized: natural text
# has about 4, and tokenizing costs about a second per MB, so the tokenizer's work per request follows the context,
# not the body limit.
MAX_CHARS_PER_TOKEN = 32
# Bounds that keep every logit finite (float32 and bfloat16 overflow near 3e38): |Σ w_i·Q_i + α₀ log π₁| / (α̃ · temperature)
# stays many orders of magnitude below that.
DIAL_RANGE = (1e-3, 1e3)  # alpha_0, alpha_tilde
MAX_WEIGHT = 1e3  # |adapter_weights|
MIN_TEMPERATURE = 1e-2  # besides 0 (greedy)


# ---------------------------------------------------------------------------------------------
# Requests


def _greedy_or_sampled(temperature: float) -> float:
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
    return temperature


class _Body(BaseModel):
    """Fields shared by chat and text completions; unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: Annotated[float, Field(ge=0.0, le=2.0), AfterValidator(_greedy_or_sampled)] = 1.0
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None  # count and length: checked_stops
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    alpha_0: float | None = Field(default=None, ge=DIAL_RANGE[0], le=DIAL_RANGE[1])
    alpha_tilde: float | None = Field(default=None, ge=DIAL_RANGE[0], le=DIAL_RANGE[1])
    adapter_weights: dict[str, Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT)]] | None = None
    min_tokens: int = Field(default=0, ge=0)

    def checked_stops(self, max_chars: int) -> tuple[str, ...]:
        """The non-empty stop strings; at most MAX_STOPS of at most ``max_chars`` characters each."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"stop: at most {MAX_STOPS} stop sequences, got {len(stops)}", param="stop")
        longest = max(map(len, stops), default=0)
        if longest > max_chars:
            raise APIError(400, f"stop: a stop sequence has at most {max_chars} characters, got one of {longest}", param="stop")
        return tuple(s for s in stops if s)


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens


class CompletionBody(_Body):
    prompt: str | list[str]


class APIError(Exception):
    """A request the server refuses, answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


# ---------------------------------------------------------------------------------------------
# Jobs and the worker


@dataclass
class Event:
    """What the worker tells a request: new text, the finish reason once, or an error."""

    text: str = ""
    finish: str | None = None  # "stop" or "length"
    error: str | None = None


@dataclass(eq=False)  # compared and hashed by identity
class Job:
    """One request on its way through the worker."""

    prompt: list[int]
    mixture: Mixture
    sampling: tuple[float, float]  # (temperature, top_p)
    max_tokens: int
    min_tokens: int
    stop: StopMatcher
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)  # generated, EOS excluded
    window: tuple[int, int] = (0, 0)  # incremental detokenization: (prefix, read) offsets into `tokens`
    cancelled: bool = False  # set from the event loop when the client goes away

    def publish(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens), "total_tokens": len(self.prompt) + len(self.tokens)}

    def decode_next(self, tokenizer: Any) -> str:
        """The text the newest token adds. Decoding a short window twice and keeping the difference
        (as TGI does) keeps merges and multi-byte characters whole without re-decoding everything."""
        prefix, read = self.window
        before = tokenizer.decode(self.tokens[prefix:read], skip_special_tokens=True)
        after = tokenizer.decode(self.tokens[prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):  # U+FFFD: an incomplete character
            self.window = (read, len(self.tokens))
            return after[len(before) :]
        return ""


def _borders(pattern: str) -> list[int]:
    """KMP's failure function: ``borders[i]`` is the length of the longest proper prefix of
    ``pattern[: i + 1]`` that is also a suffix of it. O(len(pattern))."""
    borders = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = borders[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        borders[i] = k
    return borders


class StopMatcher:
    """Finds the first stop string in text that arrives in pieces, in time linear in the text.

    One KMP automaton per stop string; its state, the longest prefix of that stop string that ends
    the text so far, carries over between pieces, so a character costs amortized O(1) per stop
    string however long the text or the stop strings. Only the end of the text that may still begin
    a stop string (fewer than max(len(stop)) characters) is held back; the rest is released.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.borders = [_borders(stop) for stop in self.stops]
        self.state = [0] * len(self.stops)
        self.held = ""  # the end of the text that may begin a stop string

    def feed(self, piece: str) -> tuple[str, bool]:
        """Append ``piece``; returns the text now certain (ending before the earliest-starting stop
        string, if one has appeared) and whether one has."""
        text = self.held + piece
        cut: int | None = None
        for i, (stop, borders) in enumerate(zip(self.stops, self.borders)):
            k = self.state[i]
            for end, char in enumerate(piece, len(self.held) + 1):
                while k and stop[k] != char:
                    k = borders[k - 1]
                if stop[k] == char:
                    k += 1
                if k == len(stop):  # its first occurrence, so its earliest start
                    cut = end - k if cut is None else min(cut, end - k)
                    break
            self.state[i] = k
        if cut is not None:
            return text[:cut], True
        keep = len(text) - max(self.state, default=0)
        self.held = text[keep:]
        return text[:keep], False

    def flush(self) -> str:
        """The held-back text, once the text has ended without a stop string."""
        held, self.held = self.held, ""
        return held


class Scheduler:
    """The worker thread that owns the model: a FIFO queue of waiting jobs and one running batch.

    Each iteration admits waiting jobs (oldest first, up to ``max_batch_size`` running; their
    prompts share one prefill forward), samples a token for every running job, lets finished and
    cancelled jobs leave, and runs ONE forward for all the rest.
    """

    def __init__(self, qmodel: Any, max_batch_size: int = 32, max_queue: int = 256) -> None:
        self.qmodel = qmodel
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.eos = eos_ids(qmodel)
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []  # in the batch, in its order; touched by the worker only
        self.left: Counter[str] = Counter()  # jobs that left the batch, by why: "stop", "length", "cancelled"
        self.wakeup = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="qadapter-decode", daemon=True)
        qmodel.peft_model.eval()  # PEFT's mixed batch refuses training mode

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wakeup:
            self.closed = True
            self.wakeup.notify()
        self.thread.join()

    def submit(self, job: Job) -> None:
        with self.wakeup:
            if self.closed:
                raise APIError(503, "the server is shutting down", kind="server_error")
            if len(self.waiting) >= self.max_queue:
                raise APIError(429, f"{len(self.waiting)} requests are already waiting; retry later", kind="rate_limit_error")
            self.waiting.append(job)
            self.wakeup.notify()

    def _admit(self, batch: DecodeBatch) -> list[Job]:
        """The waiting jobs that join now, oldest first; blocks while there is nothing to do."""
        with self.wakeup:
            while not self.waiting and not self.running and not self.closed:
                self.wakeup.wait()
            joining: list[Job] = []
            while batch.can_join and self.waiting and len(self.running) + len(joining) < self.max_batch_size:
                job = self.waiting.popleft()
                if not job.cancelled:
                    joining.append(job)
            return joining

    @torch.no_grad()
    def _run(self) -> None:
        batch, logits = DecodeBatch(self.qmodel), None
        while True:
            joining = self._admit(batch)
            if self.closed:
                break
            try:
                if joining:
                    ids, mask, _ = pad_rows([(job.prompt, []) for job in joining], self.qmodel.tokenizer.pad_token_id, "left")
                    new = batch.add(ids, mask, [job.mixture for job in joining])  # (joining, V)
                    logits = new if logits is None else torch.cat([logits, new])
                    self.running = self.running + joining
                tokens = self._sample(logits, self.running)  # (running,)
                alive = []
                for i, (job, token) in enumerate(zip(self.running, tokens.tolist())):
                    reason = self._advance(job, token)
                    if reason:
                        self.left[reason] += 1
                    else:
                        alive.append(i)
                batch.keep(alive)
                self.running = [self.running[i] for i in alive]
                logits = batch.step(tokens[alive]) if self.running else None
            except Exception as exc:  # a failed step fails the requests in it, not the server
                log.exception("decoding step failed")
                for job in dict.fromkeys(self.running + joining):
                    job.publish(Event(error=f"decoding failed: {exc}"))
                batch, logits, self.running = DecodeBatch(self.qmodel), None, []
        for job in self.running + list(self.waiting):
            job.publish(Event(error="the server is shutting down"))

    def _sample(self, logits: torch.Tensor, jobs: list[Job]) -> torch.Tensor:
        """One token per job, (n, V) → (n,): EOS barred below ``min_tokens``; one draw per sampling setting."""
        early = [i for i, job in enumerate(jobs) if len(job.tokens) < job.min_tokens]
        if early:
            logits[torch.tensor(early, device=logits.device).unsqueeze(1), torch.tensor(self.eos, device=logits.device)] = float("-inf")
        tokens = torch.empty(len(jobs), dtype=torch.long, device=logits.device)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.sampling, []).append(i)
        for (temperature, top_p), rows in groups.items():
            tokens[rows] = sample_next(logits[rows], temperature=temperature, top_p=top_p)
        return tokens

    def _advance(self, job: Job, token: int) -> str | None:
        """Take one sampled token and publish the text it completes; returns why the job leaves, if it does."""
        if job.cancelled:
            return "cancelled"
        if token in self.eos:
            text, finish = job.stop.flush(), "stop"
        else:
            job.tokens.append(token)
            piece = job.decode_next(self.qmodel.tokenizer)  # the worker's own: prompts are encoded with copies
            text, stopped = job.stop.feed(piece)
            finish = "stop" if stopped else "length" if len(job.tokens) >= job.max_tokens else None
            if finish == "length":
                text += job.stop.flush()
        if text or finish:
            job.publish(Event(text, finish))
        return finish


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
    """Every request must carry ``Authorization: Bearer <key>``, compared in constant time."""

    def __init__(self, key: str) -> None:
        self.key = key.encode()

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser]:
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


def _choice(chat: bool, text: str, finish: str | None, stream: bool, first: bool = False) -> dict[str, Any]:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if not stream:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
    delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


async def _events(job: Job, request: Request | None) -> AsyncIterator[Event]:
    """The job's events until it ends. A client that goes away cancels the job, which leaves the batch at the
    next step: a stream's disconnect cancels this generator (Starlette listens for it), and a waiting
    non-streaming request polls ``request``."""
    try:
        while True:
            if request is None:
                event = await job.events.get()
            else:
                try:
                    event = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
            yield event
            if event.finish or event.error:
                return
    finally:
        job.cancelled = True


def create_app(
    qmodel: Any, *, max_batch_size: int = 32, max_queue: int = 256, limits: ServeLimits = ServeLimits(), api_key: str | None = None
) -> FastAPI:
    """The FastAPI app serving ``qmodel`` (one adapter or a composition); its worker runs while the app does.
    Serve it with :func:`server_config`, which adds the request-head deadline."""
    scheduler = Scheduler(qmodel, max_batch_size, max_queue)
    window = context_window(qmodel)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="qadapter", lifespan=lifespan)
    app.state.scheduler, app.state.limits = scheduler, limits
    if api_key:  # before any body is read
        app.add_middleware(AuthenticationMiddleware, backend=APIKey(api_key), on_error=_unauthorized)
    app.add_middleware(BodyLimits, max_bytes=limits.max_request_bytes, timeout=limits.read_timeout)  # outermost: sees every response

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        where = [str(part) for part in error.get("loc", ()) if part != "body"]
        if error.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})").response()
        return APIError(400, f"{'.'.join(where) or 'body'}: {error.get('msg')}", param=where[0] if where else None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {exc}", kind="server_error").response()

    def describe(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "qadapter"}

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

    async def respond(request: Request, body: _Body, prompt: Any, chat: bool, max_tokens: int | None) -> Any:
        policy = request_mixture(qmodel, body)
        stops = body.checked_stops(limits.max_stop_chars)
        where = "messages" if chat else "prompt"
        chars = sum(len(m["content"]) for m in prompt) if chat else len(prompt)
        if chars > window * MAX_CHARS_PER_TOKEN:  # cannot fit: refused without spending seconds tokenizing it
            raise APIError(
                400,
                f"the prompt has {chars} characters; this model holds {window} tokens, at most {window * MAX_CHARS_PER_TOKEN} characters",
                param=where,
                code="context_length_exceeded",
            )
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
        if body.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({body.min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens")
        job = Job(ids, policy, (body.temperature, body.top_p), max_tokens, body.min_tokens, StopMatcher(stops), asyncio.get_running_loop())
        scheduler.submit(job)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            head["object"] = "chat.completion.chunk" if chat else "text_completion"
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(job, head, chat, include_usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, finish = "", None
        async for event in _events(job, request):
            if event.error:
                raise APIError(500, event.error, kind="server_error")
            text, finish = text + event.text, event.finish
        head["object"] = "chat.completion" if chat else "text_completion"
        return head | {"choices": [_choice(chat, text, finish, False)], "usage": job.usage()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Any:
        messages = [m.as_dict() for m in body.messages]
        return await respond(request, body, messages, True, body.max_completion_tokens or body.max_tokens)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "one prompt per request", param="prompt")
        return await respond(request, body, prompts[0], False, body.max_tokens)

    return app


async def _stream(job: Job, head: dict[str, Any], chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, the finish reason, optionally the usage, then [DONE]."""
    first = True
    try:
        async for event in _events(job, None):
            if event.error:
                yield _sse({"error": {"message": event.error, "type": "server_error", "param": None, "code": None}})
                break
            yield _sse(head | {"choices": [_choice(chat, event.text, event.finish, True, first)]})
            first = False
        else:
            if include_usage:
                yield _sse(head | {"choices": [], "usage": job.usage()})
        yield _sse("[DONE]")
    finally:
        job.cancelled = True  # a client gone mid-stream closes this generator: free the job's rows


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
