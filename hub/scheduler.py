"""The serving loop: requests arrive over time and share forwards (continuous batching across adapters).

One thread owns the model (the worker). Between decode steps it admits waiting jobs (up to ``max_rows`` rows in
the batch): routes the ones that asked for automatic routing in one router call, encodes them (hub/prompting.py)
and prefills them into the running batch (hub/decode.py); then it runs one step for every row, each with its
own adapter or blend, and lets finished, cancelled or timed-out rows go. Jobs talk back through a callback
``on_event(kind, value)`` called on the worker thread: ("route", Route), ("text", str) for each new piece
(streaming jobs only: every event wakes the client side, which costs the loop time), then
("done", (finish_reason, prompt_tokens, completion_tokens, text)) or ("error", exception); nothing else
follows done or error. A failing job never stops the loop.

Which thread is the worker matters on the CPU: GNU OpenMP (PyTorch's intra-op threads) stops spinning between
parallel regions once it manages more threads than there are CPUs, which a second thread driving its own team
(the model loaded on the main thread, steps on another) brings about. Each of a step's ~1,500 ops then waits for
its sleeping helper: a 16-row step measured 171-207 ms on a worker thread against 110-140 ms on the thread that
loaded the model (2 cores). `borahub serve` therefore runs the loop on the main thread (``run``) and the HTTP server
beside it (hub/server.py ``serve``); ``start=True`` gives the loop its own thread (tests, embedding in an app).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from .decode import DecodeBatch, Row, Sampling
from .engine import Engine, clean_text
from .route import Route, RouterError

log = logging.getLogger("borahub")


class QueueFull(Exception):
    """More jobs waiting than the scheduler accepts (the server answers 429)."""


class JobTimeout(Exception):
    """A job ran past its deadline (waiting or generating)."""


@dataclass
class Job:
    text: str  # the raw input: what routing sees
    on_event: Callable[[str, object], None]
    task: str | None = None  # an adapter name, or None: route the text
    messages: list[dict] | None = None  # a chat request (text is its last user message)
    chat: bool = True  # wrap a plain prompt in the chat template (when no task template applies)
    mode: str = "fallback"
    sampling: Sampling = field(default_factory=Sampling)
    generate: bool = True  # False: route only
    stream: bool = False  # send ("text", piece) events as the text grows
    template: bool = True  # False: the input is the model's text already (no task template)
    timeout: float = 600.0
    cancelled: bool = False  # set by the client side (e.g. a disconnect); the job leaves at the next step
    row: Row | None = None
    route: Route | None = None
    prompt_tokens: int = 0
    deadline: float = 0.0
    ended: bool = False

    def emit(self, kind: str, value) -> None:
        """Tell the client side; a client side that is gone (e.g. its event loop closed) never stops the loop."""
        try:
            self.on_event(kind, value)
        except Exception as e:
            self.cancelled = True
            log.debug("job event %s not delivered: %s", kind, e)

    def end(self, kind: str, value) -> None:
        if not self.ended:
            self.ended = True
            self.emit(kind, value)


class Scheduler:
    """max_rows: rows decoded together; max_queue: jobs waiting beyond that are refused (QueueFull);
    gather_s: how long an idle scheduler waits after a job arrives for others to prefill with it."""

    def __init__(self, engine: Engine, max_rows: int = 16, max_queue: int = 64, gather_s: float = 0.02,
                 start: bool = True):
        self.engine, self.max_rows, self.max_queue, self.gather_s = engine, max_rows, max_queue, gather_s
        self.batch = DecodeBatch(engine.mtm, engine.prefixes)
        self.jobs: dict[int, Job] = {}  # id(row) -> job, for the rows in the batch
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.running = True
        self.steps = self.peak_rows = self.cancelled = self.prefills = 0
        self.seconds = {"route": 0.0, "prefill": 0.0, "decode": 0.0}  # the worker's busy time, by phase
        self.worker: str | None = None  # the name of the thread running the loop
        self.thread = None
        if start:
            self.thread = threading.Thread(target=self.run, name="borahub-scheduler", daemon=True)
            self.thread.start()

    # -- client side ---------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests waiting (limit {self.max_queue}); retry later")
            job.deadline = time.monotonic() + job.timeout
            self.waiting.append(job)
            self.cond.notify()
        return job

    def stop(self) -> None:
        """Ask the loop to end (it fails the jobs still waiting or running, then returns)."""
        with self.cond:
            self.running = False
            self.cond.notify()

    def close(self) -> None:
        self.stop()
        if self.thread is not None:
            self.thread.join(timeout=30)

    @property
    def load(self) -> dict:
        return {"running": len(self.batch), "waiting": len(self.waiting), "max_rows": self.max_rows,
                "max_queue": self.max_queue, "steps": self.steps, "prefills": self.prefills, "worker": self.worker,
                "peak_rows": self.peak_rows, "cancelled": self.cancelled,
                "busy_s": {k: round(v, 3) for k, v in self.seconds.items()}}

    # -- worker side ---------------------------------------------------------------------------
    @contextmanager
    def _busy(self, phase: str):
        """Count the time of the block (finished or failed) as the worker's busy time in ``phase``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """The loop, on the calling thread, until ``stop`` (or ``until()`` turns true, checked while idle)."""
        self.worker = threading.current_thread().name
        while True:
            with self.cond:
                while self.running and not self.waiting and not len(self.batch):
                    if until is not None and until():
                        self.running = False
                        break
                    self.cond.wait(timeout=0.5)
                if not self.running:
                    break
                if not len(self.batch):  # idle: requests sent together (a burst) are prefilled together
                    end = time.monotonic() + self.gather_s
                    while len(self.waiting) < self.max_rows and time.monotonic() < end:
                        self.cond.wait(timeout=max(0.0, end - time.monotonic()))
                free = self.max_rows - len(self.batch)
                new = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
            try:
                if new:
                    self._admit(new)
                    self._reap()  # rows done at their first token leave before the step
                if len(self.batch):
                    with self._busy("decode"):
                        self.batch.step()
                    self.steps += 1
            except Exception as e:  # a broken step fails the rows in it, never the server
                log.exception("decode step failed")
                for job in self.jobs.values():
                    job.end("error", e)
                self.jobs, self.batch = {}, DecodeBatch(self.engine.mtm, self.engine.prefixes)
            self._reap()
        for job in [*self.jobs.values(), *self.waiting]:
            job.end("error", RouterError("the server is shutting down"))

    @staticmethod
    def _expired(job: Job, now: float) -> bool:
        """End a waiting job that was cancelled or has waited past its deadline; say whether it ended."""
        if job.cancelled:
            job.end("done", ("cancelled", 0, 0, ""))
        elif now > job.deadline:
            job.end("error", JobTimeout(f"waited {job.timeout:g} s in the queue"))
        return job.ended

    def _admit(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        live = [j for j in jobs if not self._expired(j, now)]
        for mode in {j.mode for j in live}:  # one router call per mode; named adapters are overrides
            group = [j for j in live if j.mode == mode]
            try:
                with self._busy("route"):
                    routes = self.engine.route([j.text for j in group], mode=mode, task=[j.task for j in group])
            except Exception as e:
                for j in group:
                    j.end("error", e)
                continue
            for j, r in zip(group, routes):
                j.route = r
        rows = []
        for j in live:
            if j.ended:
                continue
            j.emit("route", j.route)
            if not j.generate:
                j.end("done", ("route", 0, 0, ""))
                continue
            try:
                budget = self.engine.budget(j.sampling.max_new_tokens)
                task = j.route.task if j.template else None
                messages = None if j.messages is None else \
                    [{**m, "content": clean_text(m["content"], f"message {i + 1}")} for i, m in enumerate(j.messages)]
                ids, _ = self.engine._encode(clean_text(j.text, "request"), j.chat, budget, "request", task, messages)
                on_text = (lambda _r, piece, j=j: j.emit("text", piece)) if j.stream else None
                j.row = self.engine.row(ids, j.route, j.sampling, on_text=on_text)
            except Exception as e:
                j.end("error", e)
                continue
            j.prompt_tokens = len(ids)
            rows.append(j.row)
            self.jobs[id(j.row)] = j
        if rows:
            try:
                with self._busy("prefill"):
                    self.batch.add(rows)
                self.prefills += 1
                self.peak_rows = max(self.peak_rows, len(self.batch))
            except Exception:
                for r in rows:
                    self.jobs.pop(id(r), None)
                raise

    def _reap(self) -> None:
        now = time.monotonic()
        with self.cond:  # waiting jobs past their deadline (or cancelled) leave the queue
            late = [j for j in self.waiting if j.cancelled or now > j.deadline]
            for j in late:
                self.waiting.remove(j)
        for j in late:
            self._expired(j, now)
        gone = []
        for row in self.batch.rows:
            job = self.jobs[id(row)]
            if job.cancelled:
                self.cancelled += 1
                job.end("done", ("cancelled", job.prompt_tokens, len(row.out), row.text))
            elif row.finish is not None:
                job.end("done", (row.finish, job.prompt_tokens, len(row.out), row.text))
            elif now > job.deadline:
                job.end("error", JobTimeout(f"ran past its {job.timeout:g} s timeout"))
            else:
                continue
            gone.append(row)
            del self.jobs[id(row)]
        self.batch.drop(gone)
