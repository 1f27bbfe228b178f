"""CudaBackend: a real GPU. Expert copies run on a dedicated copy stream from pinned host
memory into preallocated slot buffers (``non_blocking=True``), one ``torch.cuda.Event``
per copy; the compute stream waits on exactly the events of the experts it uses.
Before a slot is overwritten the copy stream waits on the slot's release event (recorded
on the compute stream after the slot's last reader), so a copy never races a kernel.

Time: ``now()`` is wall-clock seconds since ``reset_clock``. Intervals are bracketed by
CUDA events and folded into the timeline once the GPU has passed them (at each token or
speculation cycle, event queries only, and at ``finalize_timeline``), so recording costs
no synchronisation on the hot path and a run holds one cycle's events, not all of them. I/O stall is the time between an
event recorded on the compute stream just before a wait and one just after it; those
pairs are resolved at each speculation cycle's start and end (``resolve_stalls``, event
queries only), so the governor sees each cycle's stall as it runs.

Host compute (hybrid execution): one worker thread is the host stream. A host job waits
for an event recorded on the compute stream when the job was issued (its activations are
then ready), copies them to the host on a side stream, runs the expert with moespeq's CPU
kernels where they build, else torch's (``--cpu-threads``), from the expert's pinned host copy, and copies the output back
on another side stream; the compute stream waits on that copy's event only when it needs
the output, so the GPU goes on computing resident experts meanwhile. Weights never cross
the link. ``copy_eta`` / ``host_eta`` predict completion from the profile's figures and a
ledger of what is queued on each stream.

The disk tier (docs/design.md §9): host expert buffers are ordinary memory registered with
CUDA (``pin``: ``cudaHostRegister`` of exactly their size, not the caching allocator's
power-of-two blocks; backends/host_registry.py undoes each registration at ``close`` or
when its memory goes). A read runs on the disk reader's I/O threads; before overwriting a
host slot the thread waits for the slot's readers (the copy that reads it: its CUDA event;
a CPU job: its future). A copy whose bytes are still being read cannot be enqueued yet
(a stream cannot wait on a host thread), so one issuer thread enqueues it once the read
has landed, in the order copies were asked for; its event's ``future`` says when it is
enqueued, and ``wait`` waits for that before making the compute stream wait on the copy.

Race testing: ``MOESPEQ_DEBUG_COPY_DELAY=<cycles>`` makes the copy stream spin that many
GPU cycles (``torch.cuda._sleep``) before every copy. A missing wait then reads a slot
before its bytes land and changes the tokens; the GPU check runs with it.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from moespeq_cli.runtime.backends.base import BALANCED, Backend, Event, HostJob, as_events
from moespeq_cli.runtime.backends.host_registry import HostRegistry
from moespeq_cli.runtime.planning.costs import Cost, transfer_seconds
from moespeq_cli.runtime.planning.hardware import HardwareProfile
from moespeq_cli.runtime.timeline import Interval

_BLAS_WORKSPACE: dict[tuple[int | None, int], int] = {}


def blas_workspace_bytes(device: torch.device) -> int:
    """What cuBLAS and cuBLASLt hold on ``device`` for matmuls on its current stream (the
    compute stream). torch allocates each library's workspace from its caching allocator
    at the first matmul on a (handle, stream) and keeps it for the process (recent
    releases' defaults: 32 MiB for cuBLAS on compute capability 9.0, 4-8 MiB elsewhere,
    plus cuBLASLt's), memory the plan did not count before. Measured rather than taken from
    torch's rules, which change between releases and with ``CUBLAS_WORKSPACE_CONFIG``: the
    workspaces are released (after a sync), the matmuls the models run (bf16, and with a
    bias: cuBLASLt's path) run once into preallocated outputs, and what the allocator
    holds more afterwards is the workspaces. Remembered per stream."""
    stream = torch.cuda.current_stream(device)
    key = (device.index, stream.cuda_stream)
    if key not in _BLAS_WORKSPACE:
        with torch.cuda.device(device):
            a = torch.ones(64, 64, dtype=torch.bfloat16, device=device)
            bias = torch.ones(64, dtype=torch.bfloat16, device=device)
            out = torch.empty_like(a)
            torch.cuda.synchronize(device)
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:  # an earlier matmul's workspaces would not show as allocated now
                clear()
            before = torch.cuda.memory_allocated(device)
            torch.mm(a, a, out=out)
            torch.addmm(bias, a, a, out=out)
            torch.cuda.synchronize(device)
            _BLAS_WORKSPACE[key] = max(0, torch.cuda.memory_allocated(device) - before)
    return _BLAS_WORKSPACE[key]


class CudaBackend(Backend):
    name = "cuda"
    clock_kind = "wall"

    def __init__(self, hw: HardwareProfile, capacity: int, reader=None):
        super().__init__(hw, capacity, reader)
        self.device = torch.device("cuda", torch.cuda.current_device())
        free, _total = torch.cuda.mem_get_info(self.device)
        self.capacity = min(capacity, free)
        self.compute_stream = torch.cuda.current_stream(self.device)
        self.copy_stream = torch.cuda.Stream(self.device)
        self.d2h_stream = torch.cuda.Stream(self.device)  # activations to the host
        self.ret_stream = torch.cuda.Stream(self.device)  # host outputs back
        self._host_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moespeq-host")
        delay = os.environ.get("MOESPEQ_DEBUG_COPY_DELAY", "")
        self.copy_delay = int(delay) if delay.isdigit() else 0  # GPU cycles before each copy (race tests)
        self._issuer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moespeq-copy")  # copies after reads
        self._disk_free = 0.0
        self._closed = False
        device = self.device  # the registry syncs this device, and holds no reference to the backend
        self.registry = HostRegistry(synchronize=lambda: torch.cuda.synchronize(device))  # host tier, pinned in place
        self._copy_free = 0.0  # predicted, seconds since _t0
        self._host_free = 0.0
        self._host_intervals: list[tuple] = []  # (name, start, end, layer, expert, phase), wall
        self._pending: list[tuple] = []  # (stream, kind, name, start_ev, end_ev, layer, expert, bytes)
        self._pending_lock = threading.Lock()
        self._stall_pairs: list[tuple] = []
        self._t0 = time.perf_counter()
        self._base = self._event(self.compute_stream)

    @staticmethod
    def _event(stream) -> torch.cuda.Event:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def begin(self) -> torch.cuda.Event:
        return self._event(self.compute_stream)

    def end(self, token, cost: Cost, name: str, layer=None, expert=None, stream: str = "compute") -> None:
        self._pending.append(
            (stream, "compute", name, token, self._event(self.compute_stream), layer, expert, 0, self.phase)
        )

    def copy_eta(self, nbytes: int, after: Event | None = None) -> float:
        start = max(self.now(), self._copy_free, after.time if after is not None else 0.0)
        return start + transfer_seconds(nbytes, self.hw)

    def host_eta(self, cost: Cost, act_bytes: int) -> float:
        start = max(self._host_free, self.now() + transfer_seconds(act_bytes, self.hw))
        return start + cost.host_seconds(self.hw) + transfer_seconds(act_bytes, self.hw)

    def host_compute(
        self, x, fn, cost: Cost, act_bytes: int, name: str, layer=None, expert=None, after=None
    ) -> HostJob:
        pending = [ev.future for ev in as_events(after) if ev.future is not None]
        predicted = max(self.host_eta(cost, act_bytes), max((ev.time for ev in as_events(after)), default=0.0))
        self._host_free = predicted - transfer_seconds(act_bytes, self.hw)
        ready = self._event(self.compute_stream)
        x.record_stream(self.d2h_stream)
        phase = self.phase

        def work():
            for f in pending:  # the read bringing the expert into host RAM
                f.result()
            with torch.cuda.stream(self.d2h_stream):
                self.d2h_stream.wait_event(ready)
                x_host = x.to("cpu", non_blocking=False)
            start = self.now()
            y = fn(x_host)
            self._host_intervals.append((name, start, self.now(), layer, expert, phase))
            with torch.cuda.stream(self.ret_stream):
                y_dev = y.pin_memory().to(self.device, non_blocking=True)
                done = self._event(self.ret_stream)
            y_dev.record_stream(self.compute_stream)
            return y_dev, done

        future = self._host_pool.submit(work)
        # the event carries the job's future: a host slot held by it is not refilled before the CPU is done
        return HostJob(Event(predicted, future=future), future=future, layer=layer, expert=expert)

    def host_result(self, job: HostJob) -> torch.Tensor:
        before_host = self._event(self.compute_stream)
        y, done = job.future.result()  # the host thread has finished and queued the return copy
        self.wait(Event(cuda_event=done), job.layer, job.expert, what=job.waiting, before=before_host)
        return y

    def copy(self, dst, src, nbytes, name, layer, expert, after=None) -> Event:
        events = as_events(after)
        eta = max(
            self.copy_eta(nbytes), max((ev.time for ev in events), default=0.0) + transfer_seconds(nbytes, self.hw)
        )
        self._copy_free = eta
        # blocking: a disk reader's thread waits on it before overwriting the host slot it
        # copies from (``read``), asleep rather than spinning a core the CPU experts need
        done = torch.cuda.Event(enable_timing=True, blocking=True)
        phase = self.phase

        def enqueue() -> None:
            for ev in events:
                if ev.future is not None:
                    ev.future.result()  # the read (or an earlier chained copy) has landed
            with torch.cuda.stream(self.copy_stream):
                for ev in events:
                    if ev.cuda_event is not None:
                        self.copy_stream.wait_event(ev.cuda_event)
                start = self._event(self.copy_stream)
                if self.copy_delay:
                    torch.cuda._sleep(self.copy_delay)
                dst.copy_(src, non_blocking=True)
                done.record(self.copy_stream)
            with self._pending_lock:
                self._pending.append(("copy", "copy", name, start, done, layer, expert, nbytes, phase))

        self.bytes_h2d += nbytes
        if any(ev.future is not None and not ev.future.done() for ev in events):
            return Event(eta, cuda_event=done, future=self._issuer.submit(enqueue))
        enqueue()
        return Event(eta, cuda_event=done)

    def read_eta(self, nbytes: int) -> float:
        return max(self.now(), self._disk_free) + self.read_seconds(nbytes)

    def read(self, dst, what, nbytes, name, layer, expert, after=None) -> Event:
        events = as_events(after)
        eta = self.read_eta(nbytes)
        self._disk_free = eta
        phase = self.phase

        def before() -> None:  # the slot's readers: a copy up to the device, a CPU job
            for ev in events:
                if ev.future is not None:
                    ev.future.result()
                if ev.cuda_event is not None:
                    ev.cuda_event.synchronize()

        def done(start: float, end: float) -> None:
            t0 = self._t0
            self._host_intervals.append((name, start - t0, end - t0, layer, expert, phase, "disk", nbytes))

        self.bytes_read += nbytes
        return Event(eta, future=self.reader.submit(what, dst, before=before, done=done).future)

    def pin(self, block: torch.Tensor, owner) -> None:
        """Page-lock a host block of exactly its size (cudaHostRegister), so copies from it
        run asynchronously at full link speed without the pinned allocator's rounding;
        undone at ``close`` or when ``owner`` (the memory's ``PageMapping``) is freed."""
        self.registry.register(block, owner)

    def close(self) -> None:
        if self._closed:  # Engine.close may be called twice
            return
        self._closed = True
        self.synchronize()  # no copy may still read the memory about to be unregistered
        super().close()
        self._issuer.shutdown(wait=True)
        self._host_pool.shutdown(wait=True)
        self.registry.close()

    def wait(self, event: Event, layer=None, expert=None, what: str = "wait H2D", before=None) -> None:
        if event.future is not None and event.future.done():
            event.future.result()  # a read (or the copy after it) that failed raises here: its event was never recorded
        if event.future is not None and not event.future.done():
            # the copy waits for a read: the host blocks until it is enqueued; the stall is what
            # the compute stream then shows between an event before the block and one after the copy
            before = before if before is not None else self._event(self.compute_stream)
            event.future.result()
        elif before is None and event.cuda_event.query():
            return  # already complete: no stall possible
        before = before if before is not None else self._event(self.compute_stream)
        self.compute_stream.wait_event(event.cuda_event)
        after = self._event(self.compute_stream)
        self._stall_pairs.append((before, after, layer, expert, what))

    def ready(self, event: Event) -> bool:
        if event.future is not None and (not event.future.done() or self.failed(event)):
            return False  # (a failed one never is: an unrecorded CUDA event reads as complete)
        return event.cuda_event is None or bool(event.cuda_event.query())

    def record_release(self) -> Event:
        return Event(self.now(), cuda_event=self._event(self.compute_stream))

    def upload(self, values: list[int]) -> torch.Tensor:
        # pinned (torch's caching host allocator keeps the block until the copy has run),
        # so the copy neither waits for the stream nor is overwritten while in flight
        host = torch.tensor(values, dtype=torch.int32, pin_memory=True)
        return host.to(self.device, non_blocking=True)

    def reset_clock(self) -> None:
        self.synchronize()
        super().reset_clock()
        if self.reader is not None:
            self.reader.drain()
        self._pending.clear()
        self._stall_pairs.clear()
        self._host_intervals.clear()
        self._copy_free = self._host_free = self._disk_free = 0.0
        self._t0 = time.perf_counter()
        self._base = self._event(self.compute_stream)

    def synchronize(self) -> None:
        if self.reader is not None:
            self.reader.drain()  # every read has landed (and logged its interval) ...
        self._issuer.submit(lambda: None).result()  # ... every chained copy is enqueued ...
        self._host_pool.submit(lambda: None).result()  # ... every CPU expert's job has run (one thread: in order) ...
        torch.cuda.synchronize(self.device)  # ... and all of it is done

    def resolve_stalls(self) -> None:
        """The stalls and intervals whose closing event the GPU has passed, folded into
        ``io_stall_s`` and the timeline now (a cycle ends with the sampler reading the
        logits, so all of its are), their events dropped: a run keeps one cycle's events,
        not every one since the start. The rest wait for ``finalize_timeline``. Queries
        events, never synchronises."""
        self.io_stall_s += fold_stalls(self._base, self._stall_pairs, self.timeline, done_only=True)
        self._fold_pending(done_only=True)

    def _fold_pending(self, done_only: bool) -> None:
        with self._pending_lock:  # the issuer thread appends copies
            pending, self._pending = self._pending, []
        keep = []
        for item in pending:
            stream, kind, name, s, e, layer, expert, nbytes, phase = item
            if done_only and not e.query():
                keep.append(item)
                continue
            start, end = self._base.elapsed_time(s) / 1e3, self._base.elapsed_time(e) / 1e3
            self.timeline.add(Interval(stream, kind, name, start, end, layer, expert, nbytes, phase))
        with self._pending_lock:
            self._pending[:0] = keep

    def finalize_timeline(self) -> None:
        self.synchronize()
        t = self._base
        self._fold_pending(done_only=False)
        self.io_stall_s += fold_stalls(t, self._stall_pairs, self.timeline, done_only=False)
        for name, start, end, layer, expert, phase, *rest in self._host_intervals:
            stream, nbytes = rest if rest else ("host", 0)
            kind = "read" if stream == "disk" else "compute"
            self.timeline.add(Interval(stream, kind, name, start, end, layer, expert, nbytes, phase))
        self._pending.clear()
        self._stall_pairs.clear()
        self._host_intervals.clear()


def fold_stalls(base, pairs: list, timeline, done_only: bool) -> float:
    """Stall seconds of ``pairs`` ((before, after, layer, expert, what): events recorded on
    the compute stream around a wait), measured from ``base``; each becomes a timeline
    interval and leaves ``pairs``. ``done_only``: only pairs whose ``after`` event has
    completed (``query()``), the others stay for later; ``before`` precedes ``after`` on
    the same stream, so it has completed too."""
    total, keep = 0.0, []
    for pair in pairs:
        before, after, layer, expert, what = pair
        if done_only and not after.query():
            keep.append(pair)
            continue
        start, end = base.elapsed_time(before) / 1e3, base.elapsed_time(after) / 1e3
        if end > start:
            stall = what != BALANCED  # a balanced expert's wait is the layer's compute
            total += end - start if stall else 0.0
            timeline.add(Interval("compute", "stall" if stall else "compute", what, start, end, layer, expert))
    pairs[:] = keep
    return total
