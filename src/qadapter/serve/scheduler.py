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


@dataclass
class Event:
    """What the worker tells a request: new text, the finish reason once, or an error."""

    text: str = ""
    finish: str | None = None  # "stop" or "length"
    error: str | None = None


@dataclass(eq=False)  # compared and hashed by identity
class Job:
    """One request on its way through the worker: its prompt, the stream it decodes, where its events go."""

    prompt: list[int]
    stream: Stream
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set from the event loop when the client goes away

    def publish(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def usage(self) -> dict[str, int]:
        done = len(self.stream.tokens)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": done, "total_tokens": len(self.prompt) + done}


class Scheduler:
    """The worker thread that owns the model: a FIFO queue of waiting jobs and one running batch.

    Each iteration admits waiting jobs (oldest first, up to ``max_batch_size`` running; their
    prompts share one prefill forward), samples a token for every running job, lets finished and
    cancelled jobs leave, and runs ONE forward for all the rest.
    """

    def __init__(self, qmodel: Any, max_batch_size: int = 32, max_queue: int = 256) -> None:
        self.qmodel = qmodel
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.eos, self.pad = eos_ids(qmodel), qmodel.tokenizer.pad_token_id
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
                    ids, mask, _ = pad_rows([(job.prompt, []) for job in joining], self.pad, "left")
                    new = batch.add(ids, mask, [job.stream.mixture for job in joining])  # (joining, V)
                    logits = new if logits is None else torch.cat([logits, new])
                    self.running = self.running + joining
                for job in self.running:
                    if job.cancelled:  # leaves without a token; nobody reads its events any more
                        job.stream.finish = "cancelled"
                # the worker's own tokenizer: prompts are encoded with copies
                tokens, texts = decode_step(logits, [job.stream for job in self.running], self.eos, self.pad, self.qmodel.tokenizer)
                alive = []
                for i, (job, text) in enumerate(zip(self.running, texts)):
                    finish = job.stream.finish
                    if finish != "cancelled" and (text or finish):
                        job.publish(Event(text, finish))
                    if finish:
                        self.left[finish] += 1
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
