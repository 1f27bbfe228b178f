"""CudaBackend: a real GPU. Expert copies run on a dedicated copy stream from pinned host
memory into preallocated slot buffers (``non_blocking=True``), one ``torch.cuda.Event``
per copy; the compute stream waits on exactly the events of the experts it uses.
Before a slot is overwritten the copy stream waits on the slot's release event (recorded
on the compute stream after the slot's last reader), so a copy never races a kernel.

Time: ``now()`` is wall-clock seconds since ``reset_clock``. Intervals are bracketed by
CUDA events and resolved into the timeline once, at the end (``finalize_timeline``), so
recording costs no synchronisation on the hot path. I/O stall is the time between an
event recorded on the compute stream just before a wait and one just after it.
"""

from __future__ import annotations

import time

import torch

from moespeq_cli.runtime.backends.base import Backend, Event
from moespeq_cli.runtime.costs import Cost
from moespeq_cli.runtime.hardware import HardwareProfile
from moespeq_cli.runtime.timeline import Interval


class CudaBackend(Backend):
    name = "cuda"
    clock_kind = "wall"

    def __init__(self, hw: HardwareProfile, capacity: int):
        super().__init__(hw, capacity)
        self.device = torch.device("cuda", torch.cuda.current_device())
        free, _total = torch.cuda.mem_get_info(self.device)
        self.capacity = min(capacity, free)
        self.compute_stream = torch.cuda.current_stream(self.device)
        self.copy_stream = torch.cuda.Stream(self.device)
        self._pending: list[tuple] = []  # (stream, kind, name, start_ev, end_ev, layer, expert, bytes)
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

    def copy(self, dst, src, nbytes, name, layer, expert, after: Event | None = None) -> Event:
        with torch.cuda.stream(self.copy_stream):
            if after is not None and after.cuda_event is not None:
                self.copy_stream.wait_event(after.cuda_event)
            start = self._event(self.copy_stream)
            dst.copy_(src, non_blocking=True)
            done = self._event(self.copy_stream)
        self.bytes_h2d += nbytes
        self._pending.append(("copy", "copy", name, start, done, layer, expert, nbytes, self.phase))
        return Event(cuda_event=done)

    def wait(self, event: Event, layer=None, expert=None) -> None:
        if event.cuda_event.query():
            return  # already complete: no stall possible
        before = self._event(self.compute_stream)
        self.compute_stream.wait_event(event.cuda_event)
        after = self._event(self.compute_stream)
        self._stall_pairs.append((before, after, layer, expert))

    def ready(self, event: Event) -> bool:
        return bool(event.cuda_event.query())

    def record_release(self) -> Event:
        return Event(cuda_event=self._event(self.compute_stream))

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=False)

    def reset_clock(self) -> None:
        self.synchronize()
        super().reset_clock()
        self._pending.clear()
        self._stall_pairs.clear()
        self._t0 = time.perf_counter()
        self._base = self._event(self.compute_stream)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def finalize_timeline(self) -> None:
        self.synchronize()
        t = self._base
        for stream, kind, name, s, e, layer, expert, nbytes, phase in self._pending:
            start, end = t.elapsed_time(s) / 1e3, t.elapsed_time(e) / 1e3
            self.timeline.add(Interval(stream, kind, name, start, end, layer, expert, nbytes, phase))
        for before, after, layer, expert in self._stall_pairs:
            start, end = t.elapsed_time(before) / 1e3, t.elapsed_time(after) / 1e3
            if end > start:
                self.io_stall_s += end - start
                self.timeline.add(Interval("compute", "stall", "wait H2D", start, end, layer, expert))
        self._pending.clear()
        self._stall_pairs.clear()
