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
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .collate import pad_rows
from .config import DecodeConfig
from .decode import DecodeBatch, Mixture, eos_ids, mixture, token_rows
from .errors import ConfigError
from .sampling import sample_next

log = logging.getLogger("qadapter.serve")
DEFAULT_MAX_TOKENS = 256  # when a request names none (capped by the room its prompt leaves)
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there


# ---------------------------------------------------------------------------------------------
# Requests


class _Body(BaseModel):
    """Fields shared by chat and text completions; unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    alpha_0: float | None = Field(default=None, gt=0.0)
    alpha_tilde: float | None = Field(default=None, gt=0.0)
    adapter_weights: dict[str, float] | None = None
    min_tokens: int = Field(default=0, ge=0)

    def stops(self) -> tuple[str, ...]:
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s)


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
    stops: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)  # generated, EOS excluded
    text: str = ""  # decoded so far, cut at a stop sequence
    sent: int = 0  # characters of `text` already published
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


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that could begin a stop sequence: kept until the next token decides."""
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


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
        self.tokenizer_lock = threading.Lock()  # the fast tokenizer is shared with the event loop's encoding
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
        finish = None
        if token in self.eos:
            finish = "stop"
        else:
            job.tokens.append(token)
            with self.tokenizer_lock:
                job.text += job.decode_next(self.qmodel.tokenizer)
            # published text never ends in the start of a stop sequence, so one can only begin after it
            cut = min((i for i in (job.text.find(stop, job.sent) for stop in job.stops) if i >= 0), default=-1)
            if cut >= 0:
                job.text, finish = job.text[:cut], "stop"
            elif len(job.tokens) >= job.max_tokens:
                finish = "length"
        ready = len(job.text) - (0 if finish else _held_back(job.text, job.stops))
        if ready > job.sent or finish:
            job.publish(Event(job.text[job.sent : ready], finish))
            job.sent = ready
        return finish


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
        return mixture(qmodel, DecodeConfig(alpha_0=body.alpha_0, alpha_tilde=body.alpha_tilde, weights=weights))
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


def create_app(qmodel: Any, *, max_batch_size: int = 32, max_queue: int = 256) -> FastAPI:
    """The FastAPI app serving ``qmodel`` (one adapter or a composition); its worker runs while the app does."""
    scheduler = Scheduler(qmodel, max_batch_size, max_queue)
    window = context_window(qmodel)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="qadapter", lifespan=lifespan)
    app.state.scheduler = scheduler

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

    def encode(prompt: Any, chat: bool) -> list[int]:
        with scheduler.tokenizer_lock:
            try:
                return token_rows(qmodel.tokenizer, [prompt], chat)[0]
            except Exception as exc:  # e.g. a chat template that refuses this sequence of roles
                raise APIError(400, f"cannot render the prompt: {exc}", param="messages" if chat else "prompt") from None

    async def respond(request: Request, body: _Body, prompt: Any, chat: bool, max_tokens: int | None) -> Any:
        policy = request_mixture(qmodel, body)
        ids = await asyncio.to_thread(encode, prompt, chat)
        room = window - len(ids)
        where = "messages" if chat else "prompt"
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
        job = Job(ids, policy, (body.temperature, body.top_p), max_tokens, body.min_tokens, body.stops(), asyncio.get_running_loop())
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


def serve(qmodel: Any, *, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 32, max_queue: int = 256) -> None:
    """Serve ``qmodel`` until interrupted; loopback only unless ``host`` says otherwise."""
    uvicorn.run(create_app(qmodel, max_batch_size=max_batch_size, max_queue=max_queue), host=host, port=port)
