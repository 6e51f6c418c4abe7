"""The engine of the server: a bounded queue of requests and one decode loop, the only code that
touches the model.

The loop runs in a thread of its own. Each turn it drops the rows of cancelled requests, takes as
many waiting requests as there are free cache rows, encodes their images and prefills them into
those rows (one batch), then runs one decode step over every row and hands each row its token. So
new arrivals are interleaved with the decode steps of the requests already running, and a row is
freed at EOS, at its max_tokens, or as soon as its client goes away. Tokens reach the event loop
through `deliver`, a callback the request gives (thread-safe: call_soon_threadsafe).

Other model work (an explanation's teacher-forced forward and backward) is handed to the loop with
call(): it runs on the loop's thread between two decode steps, never alongside one, and its result
comes back through a Future.
"""

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
from llavarad.serve.prometheus import Metrics


@dataclass(eq=False)
class Job:
    """One chat completion inside the engine."""

    prompt: list[int]  # token ids with one IMAGE_TOKEN_INDEX
    pixels: Tensor  # (3, S, S), preprocessed off the event loop
    max_tokens: int
    sampling: Sampling
    deliver: Callable[[Token | BaseException], None]  # called from the loop's thread
    arrival: float = field(default_factory=time.monotonic)
    key: int = field(default_factory=itertools.count().__next__)
    first_token: float | None = None
    cancelled: bool = False  # set by cancel(): a job still waiting is skipped, a running one loses its row


class Scheduler:
    """submit() jobs from any thread; the loop thread generates them `batch_size` at a time."""

    def __init__(self, model: LlavaRad, eos_id: int, batch_size: int, max_len: int, max_queue: int, metrics: Metrics,
                 cuda_graph: bool = False, compile: bool = False):
        self.model, self.metrics = model, metrics
        self.waiting: queue.Queue[Job] = queue.Queue(max_queue)
        self.cancelled: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.calls: queue.Queue[tuple[Future, Callable[[], object]]] = queue.Queue(max_queue)
        self.stopping = threading.Event()
        self.generator = BatchGenerator(model.llm, batch_size, max_len, eos_id, cuda_graph=cuda_graph, compile=compile, sample=True)
        self.thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self.failure: BaseException | None = None

    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping.is_set()

    def submit(self, job: Job) -> None:
        """Queue a job; raises queue.Full when `max_queue` jobs are already waiting."""
        if not self.alive():
            raise RuntimeError("the decode loop is not running")
        self.waiting.put_nowait(job)
        self.metrics.queue.set(self.waiting.qsize())

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the loop's thread between decode steps; raises queue.Full when `max_queue` calls wait.
        An exception fn raises goes to the Future, not to the loop."""
        if not self.alive():
            raise RuntimeError("the decode loop is not running")
        future: Future = Future()
        self.calls.put_nowait((future, fn))
        return future

    def cancel(self, job: Job) -> None:
        """Free the job's row (or skip it in the queue); safe to call for a finished job."""
        job.cancelled = True
        self.cancelled.put(job)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; jobs still running or waiting get a RuntimeError."""
        self.stopping.set()
        self.thread.join(timeout)

    def _loop(self) -> None:
        live: dict[int, Job] = {}
        try:
            while not self.stopping.is_set():
                while not self.cancelled.empty():
                    job = self.cancelled.get()
                    if live.pop(job.key, None) is not None:
                        self.generator.cancel(job.key)
                self._run_calls()
                new = self._take(self.generator.free_rows(), block=not live)
                tokens = self._admit(new, live) if new else []
                if live:
                    tokens += self.generator.step()
                self._hand_out(tokens, live)
        except BaseException as e:  # the model failed: every request in flight gets the error
            self.failure = e
            print(f"error: decode loop stopped: {type(e).__name__}: {e}", file=sys.stderr)
        error = self.failure or RuntimeError("the server is shutting down")
        for job in [*live.values(), *self._take(self.waiting.qsize(), block=False)]:
            job.deliver(error)
        while not self.calls.empty():
            self.calls.get_nowait()[0].set_exception(error)
        self.metrics.active.set(0)

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
