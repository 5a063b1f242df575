"""The server's worker: one thread owns the model and decodes every running request as one
:class:`~qadapter.decode.DecodeBatch`, one forward per step; requests join and leave between steps."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..collate import pad_rows
from ..decode import DecodeBatch, Mixture, eos_ids
from ..sampling import sample_next
from .schema import APIError

log = logging.getLogger("qadapter.serve")


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
