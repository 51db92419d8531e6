"""Request batching for a server: concurrent requests are generated together.

A worker thread owns the Generator. It takes the first queued request, waits up to `wait_s` for more
(up to `max_batch`), generates them as one batch, and resolves each request's future; a request with
a `stream` callback receives its row's tokens after every decode chunk. A batch runs to completion
before the next one starts (no continuous batching: a late request waits for the running batch).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from moejax.infer.generate import Generator
from moejax.infer.sampling import SamplingParams


@dataclasses.dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    stream: Callable[[list[int], bool], None] | None = None  # (tokens so far, done)
    future: Future = dataclasses.field(default_factory=Future)


class Engine:
    def __init__(self, generator: Generator, *, max_batch: int = 16, wait_s: float = 0.005):
        self.generator = generator
        self.max_batch, self.wait_s = max_batch, wait_s
        self.queue: queue.Queue[Request | None] = queue.Queue()
        self.batch_sizes: list[int] = []  # for tests and logs
        self.lock = threading.Lock()
        self.worker = threading.Thread(target=self._run, name="moejax-engine", daemon=True)
        self.worker.start()

    def submit(self, prompt: list[int], params: SamplingParams, stream=None) -> Future:
        req = Request(prompt, params, stream)
        self.queue.put(req)
        return req.future

    def close(self):
        self.queue.put(None)
        self.worker.join(timeout=10)

    def _take(self) -> list[Request] | None:
        first = self.queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            try:
                req = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if req is None:
                self.queue.put(None)
                break
            batch.append(req)
        return batch

    def _run(self):
        while True:
            batch = self._take()
            if batch is None:
                return
            self.batch_sizes.append(len(batch))
            streams = [r.stream for r in batch]

            def on_chunk(tokens, done):
                for s, t, d in zip(streams, tokens, done):  # noqa: B023 - called within this batch's generate()
                    if s is not None:
                        s(t, d)

            try:
                outs = self.generator.generate(
                    [r.prompt for r in batch],
                    [r.params for r in batch],
                    on_chunk=on_chunk if any(streams) else None,
                )
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the worker lives on
                for r in batch:
                    r.future.set_exception(e)
                continue
            for r, o in zip(batch, outs):
                r.future.set_result(o)
