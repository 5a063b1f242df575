"""What a client may send the server: OpenAI's request bodies, bounded field by field, and the error it gets back."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_STOPS = 4  # as OpenAI
MAX_CHOICES = 128  # choices per request (n × prompts), OpenAI's bound on n: each one is a row of the batch
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API and vLLM's default max_logprobs
# Bounds that keep every logit finite (float32 and bfloat16 overflow near 3e38): |Σ w_i·Q_i + α₀ log π₁| / (α̃ · temperature)
# stays many orders of magnitude below that.
DIAL_RANGE = (1e-3, 1e3)  # alpha_0, alpha_tilde
MAX_WEIGHT = 1e3  # |adapter_weights|
MIN_TEMPERATURE = 1e-2  # besides 0 (greedy)


def _greedy_or_sampled(temperature: float) -> float:
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
    return temperature


def _inert(*noops: Any) -> Any:
    """An OpenAI field this server does not implement: accepted unset (null) or at ``noops``, the values
    that change nothing, so that any other value is refused naming the field instead of ignored."""
    accepted = " or ".join(["null", *map(json.dumps, noops)])

    def check(value: Any) -> Any:
        if value is not None and value not in noops:
            raise ValueError(f"not implemented by this server; only {accepted} (no effect) is accepted")
        return value

    return Annotated[Any, AfterValidator(check)]


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Body(BaseModel):
    """Fields shared by chat and text completions. Any other field is refused (``extra="forbid"``), and
    OpenAI fields this server does not implement are accepted only at values that change nothing."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: Annotated[float, Field(ge=0.0, le=2.0), AfterValidator(_greedy_or_sampled)] = 1.0
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None  # count and length: checked_stops
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # torch.Generator's range
    top_k: int = Field(default=0, ge=-1)  # as vLLM: 0 or -1 keeps every token
    alpha_0: float | None = Field(default=None, ge=DIAL_RANGE[0], le=DIAL_RANGE[1])
    alpha_tilde: float | None = Field(default=None, ge=DIAL_RANGE[0], le=DIAL_RANGE[1])
    adapter_weights: dict[str, Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT)]] | None = None
    min_tokens: int = Field(default=0, ge=0)
    user: str | None = None  # who the request is for, in OpenAI's abuse monitoring: it changes no answer
    presence_penalty: _inert(0) = None
    frequency_penalty: _inert(0) = None
    repetition_penalty: _inert(1) = None  # vLLM's
    logit_bias: _inert({}) = None
    response_format: _inert({"type": "text"}) = None
    tools: _inert([]) = None
    tool_choice: _inert("none") = None

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
    """A chat turn: its role and its text. The other fields of OpenAI's messages (which the client's own
    replies carry, unset) are accepted only unset: none of them would reach the prompt."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None
    name: _inert() = None
    refusal: _inert() = None
    tool_calls: _inert([]) = None
    tool_call_id: _inert() = None
    function_call: _inert() = None
    audio: _inert() = None
    annotations: _inert([]) = None

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def alternatives(self) -> int | None:
        """Alternatives per token to report with its log-probability; None: no log-probabilities."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionBody(_Body):
    prompt: str | list[str] = Field(min_length=1)  # a list: one choice (or n) per prompt
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token
    echo: _inert(False) = None
    best_of: _inert(1) = None
    suffix: _inert("") = None

    def alternatives(self) -> int | None:
        """Alternatives per token to report with its log-probability; None: no log-probabilities."""
        return self.logprobs


class APIError(Exception):
    """A request the server refuses, answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)
