"""The one thread that owns the model: continuous batching of concurrent requests.

Requests are queued by the web handlers. The worker keeps one running batch
(serve/decode.py): before every decode step it admits the requests queued since the last
step, up to `max_batch_size` rows (they are prefilled together and their KV cache is
merged into the batch's), and after every step the rows that finished leave and are
answered at once. So a request's latency is about its own generation time, whatever else
runs: a short request behind a 512-token one joins at the next step and leaves after its
own tokens. Sampling settings (greedy or temperature / top_p, seed, stop, max_tokens)
are per row. A row whose client went away (its future cancelled by the handler) is
dropped at the next step.

`/health` counts a decode step as a batch: `batch_size_histogram` is the number of rows
per step.

Batch-at-a-time fallback. A model whose rows cannot join a running batch correctly (a
SafeMoE bundle with per-sequence routing, whose routing state depends on the whole
prompt and lives on the shared cache; a cache with sliding-window layers) is served as
before continuous batching, and `/health` says so (`batching`, `batching_fallback`): the
worker takes the first queued request, keeps the batch open for others a little while
(rules below), up to `max_batch_size`, and generates them together with `HFGenerator`'s
batched decode loop. Requests whose sampling settings differ cannot share that loop, so
a batch is split into groups of equal settings, one `generate` call per group. A group
decodes for its longest request's `max_tokens`; shorter requests are cut to their own
limit afterwards, and a disconnected client's request is skipped only if it has not
started.

How long a fallback batch stays open, two rules:

- gap: after each arrival the batch waits `batch_wait_s` (20 ms) more for the next one, up
  to 8 windows in all, so a burst whose requests trickle in (each is parsed and tokenised
  on the event loop first) still lands in one batch;
- follow-up: the clients the previous batch answered are likely to send their next
  requests right away, so the next batch waits for that many (plus those already queued),
  for at most a tenth of the previous batch's generation time (and 0.5 s).

Without the follow-up rule, steady clients phase-lock: once a batch is split (say 1 + 3
at concurrency 4), the two groups alternate forever, each answered while the other
generates, and a fixed window shorter than the clients' round trip never merges them
(benchmarks/bench_serve.py measured 1+3 and 2+14 splits). Waiting costs at most 10 % of a
batch's time, and only when expected clients do not come back.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from tactful.eval.generation import GenerationConfig, HFGenerator
from tactful.serve.decode import Row, RunningBatch, continuous_batching_blocker
from tactful.serve.validation import ChatRequest

log = logging.getLogger(__name__)

_STOP = object()  # queue sentinel: finish what is queued before it, then exit
_GAP_CAP_WINDOWS = 8  # the gap rule keeps a batch open for at most this many windows
_FOLLOW_UP_FRACTION = 0.1  # of the previous batch's time, spent at most waiting for its clients
_FOLLOW_UP_CAP_S = 0.5


class WorkerClosed(RuntimeError):
    """The worker is shutting down and takes no new requests."""


@dataclass
class Completion:
    """One generated reply and its token counts (OpenAI's `usage`)."""

    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Job:
    prompt_ids: list[int]
    request: ChatRequest
    seed: int
    future: Future


class BatchWorker:
    """Runs every generation on one thread; `submit` is safe to call from any thread."""

    def __init__(self, generator: HFGenerator, *, max_batch_size: int = 16, batch_wait_s: float = 0.02):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.generator = generator
        # None: continuous batching; otherwise why this model is served batch-at-a-time
        self.fallback_reason = continuous_batching_blocker(generator)
        if self.fallback_reason is not None:
            log.warning("serving batch-at-a-time, without continuous batching: %s", self.fallback_reason)
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._started_at = time.time()
        self._stats: Counter[str] = Counter()
        self._sizes: Counter[int] = Counter()
        self._running = 0  # rows in the running batch (continuous mode)
        # The previous batch: when it ended, how long it ran, how many it answered, how many
        # were queued behind it (the follow-up rule's inputs).
        self._last_end = 0.0
        self._last_seconds = 0.0
        self._last_size = 0
        self._queued_at_end = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            # daemon: a crashed main thread must not hang the process on this one
            self._thread = threading.Thread(target=self._loop, name="tactful-serve-worker", daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, prompt_ids: list[int], request: ChatRequest) -> Future:
        """Queue a rendered prompt; the future resolves to a `Completion`."""
        # A request without a seed still gets one, so that its sample is drawn from its own
        # generator and does not depend on which requests share its batch.
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        job = _Job(list(prompt_ids), request, seed % 2**64, Future())
        with self._lock:
            # Checked under the lock that close() takes, so no job lands behind the sentinel.
            if self._closed:
                raise WorkerClosed("the server is shutting down")
            self._stats["submitted"] += 1
            self._queue.put(job)
        return job.future

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = dict(self._stats)
            sizes = dict(self._sizes)
        batched = sum(k * v for k, v in sizes.items())
        n_batches = sum(sizes.values())
        done = s.get("completed", 0) + s.get("failed", 0) + s.get("cancelled", 0)
        stats = {
            "batching": "batch-at-a-time" if self.fallback_reason else "continuous",
            "requests_submitted": s.get("submitted", 0),
            "requests_completed": s.get("completed", 0),
            "requests_failed": s.get("failed", 0),
            "requests_cancelled": s.get("cancelled", 0),
            "in_flight": s.get("submitted", 0) - done,
            "running": self._running,
            "batches": n_batches,
            "max_batch_size_seen": max(sizes, default=0),
            "mean_batch_size": round(batched / n_batches, 3) if n_batches else 0.0,
            "batch_size_histogram": {str(k): sizes[k] for k in sorted(sizes)},
            "prompt_tokens": s.get("prompt_tokens", 0),
            "completion_tokens": s.get("completion_tokens", 0),
            "max_batch_size": self.max_batch_size,
            "uptime_s": round(time.time() - self._started_at, 1),
        }
        if self.fallback_reason:
            stats["batching_fallback"] = self.fallback_reason
        return stats

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        if self.fallback_reason is None:
            self._continuous_loop()
        else:
            self._batch_loop()

    # ------------------------------------------------------------------ continuous batching
    def _continuous_loop(self) -> None:
        batch = RunningBatch(self.generator)
        waiting: deque[_Job] = deque()
        stopping = False
        while True:
            idle = not batch and not waiting
            if idle and stopping:
                break  # everything queued before close() is answered
            stopping = self._take_queued(waiting, block=idle) or stopping
            try:
                self._drop_cancelled(batch, waiting)
                room = self.max_batch_size - len(batch)
                admitted = [waiting.popleft() for _ in range(min(room, len(waiting)))]
                if admitted:
                    self._join(batch, admitted)
                if batch:
                    self._step(batch)
            except Exception as e:  # a dead worker thread would leave every later request hanging
                log.exception("the decode loop failed; failing the %d request(s) in its batch", len(batch))
                jobs = [row.job for row in batch.rows]
                batch.clear()
                self._fail(jobs, e)
            self._running = len(batch)

    def _take_queued(self, waiting: deque[_Job], *, block: bool) -> bool:
        """Move everything queued to `waiting`, waiting for a first item when `block` (the
        batch is idle). True when the stop sentinel was among them."""
        stop = False
        try:
            item = self._queue.get() if block else self._queue.get_nowait()
            while True:
                if item is _STOP:
                    stop = True
                else:
                    waiting.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        return stop

    def _drop_cancelled(self, batch: RunningBatch, waiting: deque[_Job]) -> None:
        """Forget the requests whose handler cancelled them (the client disconnected)."""
        gone = [row for row in batch.rows if row.job.future.cancelled()]
        batch.remove(gone)
        kept = [job for job in waiting if not job.future.cancelled()]
        n = len(gone) + len(waiting) - len(kept)
        if n:
            waiting.clear()
            waiting.extend(kept)
            with self._lock:
                self._stats["cancelled"] += n

    def _join(self, batch: RunningBatch, jobs: list[_Job]) -> None:
        rows = [Row(j.prompt_ids, j.request, j.seed, job=j) for j in jobs]
        try:
            finished = batch.join(rows)
        except Exception as e:  # a prefill that fails (a huge prompt out of memory) fails its own rows only
            log.exception("prefill failed for %d request(s)", len(jobs))
            self._fail(jobs, e)
            return
        self._answer(finished)

    def _step(self, batch: RunningBatch) -> None:
        size = len(batch)
        try:
            finished = batch.step()
        except Exception as e:  # the batch's state is unknown now: fail its rows, keep serving
            log.exception("a decode step failed for a batch of %d request(s)", size)
            jobs = [row.job for row in batch.rows]
            batch.clear()
            self._fail(jobs, e)
            return
        with self._lock:
            self._sizes[size] += 1
        self._answer(finished)

    def _answer(self, rows: list[Row]) -> None:
        for row in rows:
            job = row.job
            try:
                done = self._completion(job, row.ids)
            except Exception as e:
                log.exception("decoding a reply failed")
                self._fail([job], e)
                continue
            # False when the handler cancelled it since the last step: nobody waits for it.
            if not job.future.set_running_or_notify_cancel():
                with self._lock:
                    self._stats["cancelled"] += 1
                continue
            with self._lock:
                self._stats["completed"] += 1
                self._stats["prompt_tokens"] += done.prompt_tokens
                self._stats["completion_tokens"] += done.completion_tokens
            job.future.set_result(done)

    def _fail(self, jobs: list[_Job], error: Exception) -> None:
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                with self._lock:
                    self._stats["failed"] += 1
                job.future.set_exception(error)
            else:
                with self._lock:
                    self._stats["cancelled"] += 1

    # ------------------------------------------------------------------ batch-at-a-time fallback
    def _batch_loop(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is _STOP:
                break
            batch, stop = self._collect(item)
            # A handler that went away (client disconnected) cancels its future; skip it.
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if len(live) < len(batch):
                with self._lock:
                    self._stats["cancelled"] += len(batch) - len(live)
            groups: dict[tuple, list[_Job]] = {}
            for job in live:
                r = job.request
                groups.setdefault(("greedy",) if r.greedy else ("sample", r.temperature, r.top_p), []).append(job)
            began = time.monotonic()
            for jobs in groups.values():
                self._run_group(jobs)
            self._last_end = time.monotonic()
            self._last_seconds = self._last_end - began
            self._last_size = len(live)
            self._queued_at_end = self._queue.qsize()

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job plus those that join it under the gap and follow-up rules (see the
        module docstring), up to the batch size. True when the stop sentinel was met."""
        batch = [first]
        start = time.monotonic()
        deadline = start + self.batch_wait_s
        hard_cap = start + _GAP_CAP_WINDOWS * self.batch_wait_s
        expect, follow_until = 0, 0.0
        if self._last_size:
            expect = min(self.max_batch_size, self._last_size + self._queued_at_end)
            follow_until = self._last_end + min(_FOLLOW_UP_CAP_S, _FOLLOW_UP_FRACTION * self._last_seconds)
        while len(batch) < self.max_batch_size:
            until = deadline if len(batch) >= expect else max(deadline, follow_until)
            remaining = until - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
            deadline = min(hard_cap, max(deadline, time.monotonic() + self.batch_wait_s))
        return batch, False

    def _run_group(self, jobs: list[_Job]) -> None:
        first = jobs[0].request
        config = GenerationConfig(
            max_new_tokens=max(j.request.max_tokens for j in jobs),
            do_sample=not first.greedy,
            temperature=first.temperature if not first.greedy else 1.0,
            top_p=first.top_p,
            seed=0,
            batch_size=len(jobs),
        )
        try:
            # HFGenerator's batch step, without its front end that renders single user
            # prompts: the server renders whole conversations itself. The step seeds each
            # row's sampler from (config.seed, row index); passing the request's seed as the
            # index gives every request a sampler that depends on its seed alone.
            outs = self.generator._generate_batch([j.prompt_ids for j in jobs], [j.seed for j in jobs], config, None)
            results = [self._completion(j, ids) for j, ids in zip(jobs, outs)]
        except Exception as e:  # one failed batch must not stop the server
            log.exception("generation failed for a batch of %d request(s)", len(jobs))
            with self._lock:
                self._stats["failed"] += len(jobs)
            for j in jobs:
                j.future.set_exception(e)
            return
        with self._lock:
            self._sizes[len(jobs)] += 1
            self._stats["completed"] += len(jobs)
            self._stats["prompt_tokens"] += sum(c.prompt_tokens for c in results)
            self._stats["completion_tokens"] += sum(c.completion_tokens for c in results)
        for j, c in zip(jobs, results):
            j.future.set_result(c)

    def _completion(self, job: _Job, ids: list[int]) -> Completion:
        gen = self.generator
        ids = ids[: job.request.max_tokens]
        stopped = bool(ids) and ids[-1] in gen.stop_ids
        text = gen.decode(ids)
        n_tokens = len(ids)
        if job.request.stop:
            cut = _first_stop(text, job.request.stop)
            if cut is not None:
                text, stopped = text[:cut], True
                n_tokens = _tokens_until_stop(gen, ids, job.request.stop)
        return Completion(text=text, finish_reason="stop" if stopped else "length",
                          prompt_tokens=len(job.prompt_ids), completion_tokens=n_tokens)


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _tokens_until_stop(gen: HFGenerator, ids: list[int], stops: list[str]) -> int:
    """How many generated tokens it took to produce the first stop string: the tokens the
    client is charged for in `usage`, as if generation had stopped there."""
    for k in range(1, len(ids) + 1):
        if _first_stop(gen.decode(ids[:k]), stops) is not None:
            return k
    return len(ids)
