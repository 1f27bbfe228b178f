"""The one thread that owns the engine, its bounded queue of jobs, and uvicorn's server
made to halt it on Ctrl-C (a generation on a big model takes minutes; uvicorn would wait
for it before shutting down)."""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass, field

import uvicorn

from moespeq_cli.conversation import Answer, complete
from moespeq_cli.errors import CheckpointError
from moespeq_cli.server.errors import ApiError, shutting_down


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: object
    stops: list[str]
    on_text: object = None  # called from the worker thread with each text piece
    on_reasoning: object = None  # and with each piece of a harmony model's reasoning (gpt-oss)
    channels: bool = False  # a chat request through the template: a harmony model's channels apart
    cancelled: bool = False  # the client went away
    answer: Answer = field(default_factory=Answer)
    stats: dict | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    notify: object = None  # called from the worker thread once the job is done (or dropped)
    on_start: object = None  # called when the worker starts the job, or when it is dropped
    running: bool = False  # the worker started it

    def start(self) -> None:
        if self.on_start is not None:
            self.on_start()

    def finish(self) -> None:
        self.done.set()
        self.start()  # (a second call: a set event is set again)
        if self.notify is not None:
            self.notify()


class Worker:
    """The one thread that touches the engine; requests wait in a bounded FIFO. ``halt``
    (Ctrl-C: uvicorn waits for open connections before it shuts down, and an answer on a
    big model can take minutes) cuts the answer in progress after its current token and
    has every queued request answered 503; ``stop`` also joins the thread."""

    def __init__(self, engine, queue_size: int):
        self.engine = engine
        self.stopping = False
        self.failing: str | None = None  # the last answer failed reading the checkpoint's files (``unhealthy``)
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.thread = threading.Thread(target=self._loop, name="moespeq-serve", daemon=True)
        self.thread.start()

    @property
    def reader(self):
        """The engine's disk tier reader (None without one: nothing to fail on)."""
        return getattr(getattr(self.engine, "backend", None), "reader", None)

    def unhealthy(self) -> bool:
        """The last answer failed reading the checkpoint's files and one of them is still
        not as it was when the server started (each request would fail alike); once they
        are whole again, healthy, before any request has proved it."""
        if self.failing is None:
            return False
        if self.reader is not None and not self.reader.changed():
            self.failing = None
        return self.failing is not None

    def submit(self, job: Job) -> None:
        if self.stopping:
            raise shutting_down()
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, "the server is busy: its queue is full; retry shortly", "queue_full") from None

    def halt(self) -> None:
        """A flag and nothing else, so that a signal handler may call it (it runs between
        two bytecodes of the main thread, perhaps inside ``submit``'s hold of the queue's
        lock): the worker cuts the answer in progress and answers what waits as it takes it."""
        self.stopping = True

    def stop(self, timeout: float = 10.0) -> None:
        self.halt()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.error = shutting_down()
                job.finish()
        with contextlib.suppress(queue.Full):  # a submit that raced the flag: the worker answers it
            self.jobs.put(None, timeout=timeout)
        self.thread.join(timeout)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.stopping and not job.cancelled:
                job.error = shutting_down()
            elif not job.cancelled:
                job.running = True
                job.start()
                try:
                    complete(
                        self.engine,
                        job.prompt_ids,
                        job.max_tokens,
                        job.sampling,
                        job.stops,
                        job.on_text,
                        cancelled=lambda job=job: job.cancelled or self.stopping,
                        answer=job.answer,
                        reuse=True,  # a conversation's earlier turns are not prefilled again
                        on_reasoning=job.on_reasoning,
                        channels=job.channels,
                    )
                    job.stats = stats_of(self.engine)
                    self.failing = None
                    a = job.answer
                    if (
                        self.stopping
                        and not job.cancelled
                        and a.finish_reason == "length"
                        and len(a.token_ids) < job.max_tokens
                    ):
                        job.error = shutting_down(": the answer was cut short")
                except BaseException as e:  # noqa: BLE001 - reported to the request, the worker goes on
                    job.error = e
                    if self.reader is not None and isinstance(
                        e, CheckpointError | OSError
                    ):  # (a shard changed under it)
                        self.failing = str(e)
            job.finish()


class HaltingServer(uvicorn.Server):
    """uvicorn's server, whose Ctrl-C (or SIGTERM) also halts the app's worker: uvicorn
    waits for open connections to close before it shuts down, and on a big model an
    answer takes minutes."""

    def __init__(self, config, on_listening=None):
        super().__init__(config)
        self.on_listening = on_listening  # called once requests are taken (a start-up line said before refused them)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not self.should_exit and self.on_listening is not None:
            self.on_listening()

    def handle_exit(self, sig, frame) -> None:
        state = self.config.app.state
        state.worker.halt()
        loop = getattr(state, "loop", None)  # (none before the app's start-up: no request yet)
        if loop is not None:  # a signal handler interrupts the loop's own code: woken, not called into
            loop.call_soon_threadsafe(state.halted.set)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:  # a second Ctrl-C: uvicorn skips the app's shutdown, whose task was
            await self.lifespan.shutdown()  # then cancelled with a traceback; ours is quick (halted)


def stats_of(engine) -> dict:
    s = engine.last_stats
    if s is None:
        return {}
    keep = ("tokens_per_s", "seconds", "clock", "acceptance_rate", "expert_hit_rate", "io_stall_s", "ttft_s")
    return {k: getattr(s, k, None) for k in keep} | {"prompt_tokens_reused": engine.reused_tokens}
