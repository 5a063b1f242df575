"""What a client may send the server: OpenAI's request bodies, bounded field by field, and the error it gets back."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_STOPS = 4  # as OpenAI
# Bounds that keep every logit finite (float32 and bfloat16 overflow near 3e38): |Σ w_i·Q_i + α₀ log π₁| / (α̃ · temperature)
# stays many orders of magnitude below that.
DIAL_RANGE = (1e-3, 1e3)  # alpha_0, alpha_tilde
MAX_WEIGHT = 1e3  # |adapter_weights|
MIN_TEMPERATURE = 1e-2  # besides 0 (greedy)


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
