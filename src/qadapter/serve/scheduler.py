"""The server's worker: one thread owns the model and decodes every running request as one
:class:`~qadapter.decode.DecodeBatch`, one forward per step, with the decoder's own
:func:`~qadapter.decode.decode_step`; requests join and leave between steps."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..collate import pad_rows
from ..decode import DecodeBatch, Stream, decode_step, eos_ids
from .schema import APIError

log = logging.getLogger("qadapter.serve")


@dataclass(frozen=True)
class Scored:
    """A generated token as text with its log-probability, and its alternatives' (text, log-probability), most likely first."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass
class Event:
    """What the worker tells a request about one of its choices: new text (and the log-probabilities of
    the tokens since the last event, where asked), the finish reason once, or an error."""

    index: int  # the choice
    text: str = ""
    finish: str | None = None  # "stop" or "length"
    error: str | None = None
    logprobs: list[Scored] = field(default_factory=list)


@dataclass(eq=False)  # compared and hashed by identity
class Job:
    """One choice of a request on its way through the worker: its prompt, the stream it decodes, where
    its events go (a queue the request's choices share)."""

    prompt: list[int]
    stream: Stream
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    index: int = 0  # of the choice in its request
    cancelled: bool = False  # set from the event loop when the client goes away
    reported: int = 0  # tokens whose log-probabilities have been published

    def publish(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    """The worker thread that owns the model: a FIFO queue of waiting jobs and one running batch.

    Each iteration admits waiting jobs (oldest first, up to ``max_batch_size`` running; their
    prompts share one prefill forward), samples a token for every running job, lets finished and
    cancelled jobs leave, and runs ONE forward for all the rest. The counters (tokens, jobs that
    left) are written by the worker only; ``/metrics`` reads them.
    """

    def __init__(self, qmodel: Any, max_batch_size: int = 32, max_queue: int = 256) -> None:
        self.qmodel = qmodel
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.eos, self.pad = eos_ids(qmodel), qmodel.tokenizer.pad_token_id
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []  # in the batch, in its order; touched by the worker only
        self.left: Counter[str] = Counter()  # jobs that left the batch, by why: "stop", "length", "cancelled"
        self.prompt_tokens = 0  # prefilled, over all jobs that joined
        self.generated_tokens = 0  # over all jobs that left
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

    @property
    def alive(self) -> bool:
        """Whether the worker runs and takes requests."""
        return self.thread.is_alive() and not self.closed

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs, all or none."""
        with self.wakeup:
            if self.closed:
                raise APIError(503, "the server is shutting down", kind="server_error")
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise APIError(
                    429, f"{len(self.waiting)} sequences are already waiting, at most {self.max_queue} may; retry later", kind="rate_limit_error"
                )
            self.waiting.extend(jobs)
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
                    ids, mask, _ = pad_rows([(job.prompt, []) for job in joining], self.pad, "left")
                    new = batch.add(ids, mask, [job.stream.mixture for job in joining])  # (joining, V)
                    logits = new if logits is None else torch.cat([logits, new])
                    self.running = self.running + joining
                    self.prompt_tokens += sum(len(job.prompt) for job in joining)
                for job in self.running:
                    if job.cancelled:  # leaves without a token; nobody reads its events any more
                        job.stream.finish = "cancelled"
                # the worker's own tokenizer: prompts are encoded with copies
                tokens, texts = decode_step(logits, [job.stream for job in self.running], self.eos, self.pad, self.qmodel.tokenizer)
                alive = []
                for i, (job, text) in enumerate(zip(self.running, texts)):
                    finish = job.stream.finish
                    if finish:  # counted before the client hears of it, so /metrics agrees with the answer it got
                        self.left[finish] += 1
                        self.generated_tokens += len(job.stream.tokens)
                    else:
                        alive.append(i)
                    scored = self._scored(job)
                    if finish != "cancelled" and (text or finish or scored):
                        job.publish(Event(job.index, text, finish, logprobs=scored))
                batch.keep(alive)
                self.running = [self.running[i] for i in alive]
                logits = batch.step(tokens[alive]) if self.running else None
            except Exception as exc:  # a failed step fails the requests in it, not the server
                log.exception("decoding step failed")
                for job in dict.fromkeys(self.running + joining):
                    job.publish(Event(job.index, error=f"decoding failed: {exc}"))
                batch, logits, self.running = DecodeBatch(self.qmodel), None, []
        for job in self.running + list(self.waiting):
            job.publish(Event(job.index, error="the server is shutting down"))

    def _scored(self, job: Job) -> list[Scored]:
        """The log-probabilities the job's stream recorded since it last published, as text (the worker's
        tokenizer: the worker owns it)."""
        new = job.stream.logprobs[job.reported :]
        job.reported += len(new)
        if not new:
            return []
        ids = [entry.token for entry in new] + [token for entry in new for token, _ in entry.top]
        texts = iter(self.qmodel.tokenizer.batch_decode([[token] for token in ids]))
        tokens = [next(texts) for _ in new]
        return [Scored(token, entry.logprob, tuple((next(texts), lp) for _, lp in entry.top)) for token, entry in zip(tokens, new)]
