"""The engine of the server: a bounded queue of requests and one decode loop, the only code that
touches the model.

The loop runs in a thread of its own. Each turn it drops the rows of cancelled requests, takes as
many waiting requests as there are free cache rows, encodes their images and prefills them into
those rows (one batch), then runs one decode step over every row and hands each row its token. So
new arrivals are interleaved with the decode steps of the requests already running, and a row is
freed at EOS, at its max_tokens, or as soon as its client goes away. A Job carries its own way
back: the loop hands each token (or the error that ends it) to `Job.deliver`, which puts it on the
job's queue in the event loop that made it; the loop never calls into the app or a response.

Other model work (an explanation's teacher-forced forward and backward) is handed to the loop with
call(): it runs on the loop's thread between two decode steps, never alongside one, and its result
comes back through a Future.

New work is refused here, in one place (`check`), with the APIError the client gets: 429 when the
queue is full, 503 when the loop is not running. stop(grace) drains: the jobs and calls still waiting
get the 503 at once, the running jobs get `grace` seconds to finish and then the same 503.
"""

import asyncio
import itertools
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llavarad.infer.generate import BatchGenerator, Prompt, Sampling, Token
from llavarad.infer.pipeline import embed_images
from llavarad.model.llava import LlavaRad
from llavarad.serve.api_error import APIError
from llavarad.serve.prometheus import Metrics


class Cancelled(Exception):
    """The client went away: what Job.next raises once Job.cancel was called."""


def _stopping() -> APIError:
    return APIError(503, "the server is shutting down; retry later", "shutting_down")


@dataclass(eq=False)
class Job:
    """One chat completion inside the engine, made on the event loop: the decode loop's thread hands it
    its tokens with deliver(); the request reads them with next() and gives up its row with cancel()."""

    prompt: list[int]  # token ids with one IMAGE_TOKEN_INDEX
    pixels: Tensor  # (3, S, S), preprocessed off the event loop
    max_tokens: int
    sampling: Sampling
    arrival: float = field(default_factory=time.monotonic)
    key: int = field(default_factory=itertools.count().__next__)
    first_token: float | None = None
    cancelled: bool = False  # a job still waiting is skipped, a running one loses its row at the next step
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop, repr=False)
    _events: asyncio.Queue = field(default_factory=asyncio.Queue, repr=False)

    def deliver(self, item: Token | BaseException) -> None:
        """From the decode loop's thread: the next token, or the exception that ends the job."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    async def next(self) -> Token:
        """The next token; raises the exception that ended the job, or Cancelled."""
        item = await self._events.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        """On the event loop: the client went away (or the answer ended); safe to call for a finished job."""
        self.cancelled = True
        self._events.put_nowait(Cancelled())


class Scheduler:
    """submit() jobs from any thread; the loop thread generates them `batch_size` at a time."""

    def __init__(self, model: LlavaRad, eos_id: int, batch_size: int, max_len: int, max_queue: int, metrics: Metrics,
                 cuda_graph: bool = False, compile: bool = False):
        self.model, self.metrics = model, metrics
        self.waiting: queue.Queue[Job] = queue.Queue(max_queue)
        self.calls: queue.Queue[tuple[Future, Callable[[], object]]] = queue.Queue(max_queue)
        self.draining, self.stopping = threading.Event(), threading.Event()  # stop(): the first, then after the grace both
        self.generator = BatchGenerator(model.llm, batch_size, max_len, eos_id, cuda_graph=cuda_graph, compile=compile, sample=True)
        self.thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self.failure: BaseException | None = None

    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.draining.is_set()

    def check(self) -> None:
        """Raises the 503 that refuses new work while the loop is not running or stops."""
        if self.draining.is_set():
            raise _stopping()
        if not self.thread.is_alive():
            raise APIError(503, "the model is not ready", "model_not_ready")

    def submit(self, job: Job) -> None:
        """Queue a job; raises check()'s 503, or 429 when `max_queue` jobs are already waiting."""
        self._enqueue(self.waiting, job)
        self.metrics.queue.set(self.waiting.qsize())

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the loop's thread between decode steps; refused as submit() is. An exception fn
        raises goes to the Future, not to the loop."""
        future: Future = Future()
        self._enqueue(self.calls, (future, fn))
        return future

    def _enqueue(self, waiting: queue.Queue, item: object) -> None:
        self.check()
        try:
            waiting.put_nowait(item)
        except queue.Full:
            raise APIError(429, "the server is busy (its queue is full); retry later", "queue_full") from None

    def stop(self, grace: float = 0.0) -> None:
        """Refuse new work and what still waits (503); give the running jobs `grace` seconds to finish,
        then end them with the same 503. Safe to call again."""
        self.draining.set()
        if self.thread.is_alive():
            self.thread.join(grace)
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(10.0)  # the step under way

    def _loop(self) -> None:
        live: dict[int, Job] = {}
        try:
            while not self.stopping.is_set():
                for key in [key for key, job in live.items() if job.cancelled]:
                    del live[key]
                    self.generator.cancel(key)
                draining = self.draining.is_set()
                if draining:
                    self._refuse_waiting(_stopping)
                    if not live:
                        break
                else:
                    self._run_calls()
                new = [] if draining else self._take(self.generator.free_rows(), block=not live)
                tokens = self._admit(new, live) if new else []
                if live:
                    tokens += self.generator.step()
                self._hand_out(tokens, live)
        except BaseException as e:  # the model failed: every request in flight gets the error
            self.failure = e
            print(f"error: decode loop stopped: {type(e).__name__}: {e}", file=sys.stderr)
        error = (lambda: self.failure) if self.failure else _stopping  # the model's exception: the request maps it
        for job in live.values():
            job.deliver(error())
        self._refuse_waiting(error)
        self.metrics.active.set(0)

    def _refuse_waiting(self, error: Callable[[], BaseException]) -> None:
        for job in self._take(self.waiting.qsize(), block=False):
            job.deliver(error())
        while not self.calls.empty():
            future = self.calls.get_nowait()[0]
            if future.set_running_or_notify_cancel():
                future.set_exception(error())

    def _run_calls(self) -> None:
        """The calls waiting now (not those queued while they run: decoding goes on between them)."""
        for _ in range(self.calls.qsize()):
            future, fn = self.calls.get_nowait()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except Exception as e:  # the caller's failure (a bad input), reported to the caller
                future.set_exception(e)

    def _take(self, n: int, block: bool) -> list[Job]:
        """Up to n waiting jobs that were not cancelled; waits a little for the first one when idle."""
        jobs = []
        while len(jobs) < n:
            try:
                job = self.waiting.get(timeout=0.05) if block and not jobs else self.waiting.get_nowait()
            except queue.Empty:
                break
            if not job.cancelled:
                jobs.append(job)
        self.metrics.queue.set(self.waiting.qsize())
        return jobs

    @torch.no_grad()
    def _admit(self, jobs: list[Job], live: dict[int, Job]) -> list[Token]:
        """Encode the jobs' images in one batch and prefill them into free rows."""
        live.update((j.key, j) for j in jobs)  # first: if the model fails below, these jobs get the error too
        embeds = embed_images(self.model, torch.stack([j.pixels for j in jobs]), [j.prompt for j in jobs])  # k x (T_j, dim)
        return self.generator.add([Prompt(j.key, e, j.max_tokens, j.sampling) for j, e in zip(jobs, embeds)])

    def _hand_out(self, tokens: list[Token], live: dict[int, Job]) -> None:
        now = time.monotonic()
        for t in tokens:
            job = live[t.key]
            if job.first_token is None:
                job.first_token = now
                self.metrics.ttft.observe(now - job.arrival)
            job.deliver(t)
            if t.finish is not None:
                del live[t.key]
                self.metrics.latency.observe(now - job.arrival)
        self.metrics.tokens.inc(len(tokens))
        self.metrics.active.set(len(live))
