"""The server's ``/metrics`` in Prometheus's text exposition format (version 0.0.4): requests by route
and status, their latency, prompt and generated tokens, and the waiting and running sequences.
prometheus_client is not a dependency; these few families need only the format's text."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .scheduler import Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUTES = ("/v1/chat/completions", "/v1/completions")  # the requests counted and timed
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)  # seconds

Sample = tuple[str, dict[str, str], float]  # (suffix of the name, labels, value)


@dataclass
class Histogram:
    """Observations counted into cumulative buckets, as Prometheus's histogram."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(init=False)  # per bound, not cumulative
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break

    def samples(self, labels: dict[str, str]) -> list[Sample]:
        cumulative, out = 0, []
        for bound, n in zip(self.bounds, self.counts):
            cumulative += n
            out.append(("_bucket", labels | {"le": f"{bound:g}"}, cumulative))
        return [*out, ("_bucket", labels | {"le": "+Inf"}, self.count), ("_sum", labels, self.total), ("_count", labels, self.count)]


@dataclass
class RequestStats:
    """What the event loop sees of the counted routes: requests by (route, status), and latency per route of the answered ones."""

    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    latency: dict[str, Histogram] = field(default_factory=dict)

    def record(self, route: str, status: int, seconds: float) -> None:
        self.requests[route, status] += 1
        if 200 <= status < 300:  # refusals take no time and would hide the latency of answers
            self.latency.setdefault(route, Histogram()).observe(seconds)


class RequestMetrics:
    """ASGI middleware that records every request to :data:`ROUTES` in ``stats``: its status, and its time
    from arrival to the last byte of the answer (the end of the stream, for a streamed one)."""

    def __init__(self, app: ASGIApp, stats: RequestStats) -> None:
        self.app, self.stats = app, stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in ROUTES:
            await self.app(scope, receive, send)
            return
        start, status = time.monotonic(), 500  # an app that fails before answering: uvicorn answers 500

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            self.stats.record(scope["path"], status, time.monotonic() - start)


def family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    """One metric family's lines. Label values come from fixed sets (routes, statuses, reasons): nothing to escape."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for suffix, labels, value in samples:
        label_text = ",".join(f'{key}="{val}"' for key, val in labels.items())
        lines.append(f"{name}{suffix}{{{label_text}}} {value}" if labels else f"{name}{suffix} {value}")
    return lines


def exposition(stats: RequestStats, scheduler: Scheduler) -> str:
    """Every family, in the text format. The scheduler's counters are written by its worker only; reading an int
    or copying a dict is atomic in CPython."""
    left = dict(scheduler.left)
    lines = [
        *family("qadapter_requests_total", "counter", "Completion requests by route and HTTP status.",
                [("", {"route": route, "status": str(status)}, n) for (route, status), n in sorted(stats.requests.items())]),
        *family("qadapter_request_duration_seconds", "histogram", "Time from a 2xx completion request's arrival to its last byte.",
                [sample for route, histogram in sorted(stats.latency.items()) for sample in histogram.samples({"route": route})]),
        *family("qadapter_prompt_tokens_total", "counter", "Prompt tokens prefilled (once per choice).", [("", {}, scheduler.prompt_tokens)]),
        *family("qadapter_generation_tokens_total", "counter", "Tokens generated, counted as each choice ends.",
                [("", {}, scheduler.generated_tokens)]),
        *family("qadapter_sequences_finished_total", "counter", "Choices that left the batch, by why.",
                [("", {"reason": reason}, n) for reason, n in sorted(left.items())]),
        *family("qadapter_sequences_waiting", "gauge", "Choices waiting for a place in the batch.", [("", {}, len(scheduler.waiting))]),
        *family("qadapter_sequences_running", "gauge", "Choices being decoded.", [("", {}, len(scheduler.running))]),
    ]
    return "\n".join(lines) + "\n"
