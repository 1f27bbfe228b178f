"""CpuBackend: offloading for real on a machine with no GPU, timed by the wall clock.

Host RAM is the compute tier: its expert slots are what the CPU computes from, and the
checkpoint's files on disk are the slow link below it (docs/design.md §9). The backend
interface maps one to one:

- the compute stream is the Python thread itself: ``begin``/``end`` bracket what it
  computes and record the wall-clock interval;
- a "copy" into the compute tier is a ``read``: the disk reader's I/O threads read the
  expert's bytes (O_DIRECT, tiers/disk.py) into its RAM slot while the compute thread goes
  on; the event is the read's future;
- ``wait`` blocks until the read has landed; the time blocked is I/O stall;
- a slot's release is the compute thread having finished with it, which is always in the
  past by the time a new read is issued.

There is no separate device, so nothing is copied and no expert is "computed on the
host" beside it: the hybrid path does not apply here (the engine refuses it up front).
"""

from __future__ import annotations

import time

import torch

from moespeq_cli import kernels
from moespeq_cli.runtime.backends.base import Backend, Event, HostJob, as_events
from moespeq_cli.runtime.planning.costs import Cost
from moespeq_cli.runtime.timeline import Interval

NO_DEVICE = "the cpu backend has no device beside the CPU: nothing is copied or sent to the host"


class CpuBackend(Backend):
    name = "cpu"
    clock_kind = "wall"
    device = torch.device("cpu")

    def __init__(self, capacity: int, reader, hw=None):
        super().__init__(hw, capacity, reader)
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def begin(self) -> float:
        return time.perf_counter()

    def end(self, token, cost: Cost, name: str, layer=None, expert=None, stream: str = "compute") -> None:
        t0 = self._t0
        self.timeline.add(
            Interval(stream, "compute", name, token - t0, time.perf_counter() - t0, layer, expert, 0, self.phase)
        )

    # -- the disk ---------------------------------------------------------------
    def read(self, dst, what, nbytes, name, layer, expert, after=None) -> Event:
        pending = [ev.future for ev in as_events(after) if ev.future is not None]
        phase = self.phase

        def before() -> None:
            for f in pending:
                f.result()

        def done(start: float, end: float) -> None:
            t0 = self._t0
            self.timeline.add(Interval("disk", "read", name, start - t0, end - t0, layer, expert, nbytes, phase))

        self.bytes_read += nbytes
        return Event(self.now(), future=self.reader.submit(what, dst, before=before, done=done).future)

    # -- waiting ------------------------------------------------------------------
    def wait(self, event: Event, layer=None, expert=None, what: str = "wait read") -> None:
        f = event.future
        if f is None:
            return
        if f.done():
            f.result()  # a failed read raises here
            return
        start = time.perf_counter()
        with kernels.held():  # the cores stay awake for the compute that follows
            f.result()
        end = time.perf_counter()
        self.io_stall_s += end - start
        t0 = self._t0
        self.timeline.add(Interval("compute", "stall", what, start - t0, end - t0, layer, expert, 0, self.phase))

    def ready(self, event: Event) -> bool:
        if event.future is None:
            return True
        return event.future.done() and not self.failed(event)  # (a failed read: waited for, and raised)

    def record_release(self) -> Event:
        return Event(self.now())  # the compute thread is past every earlier use

    def synchronize(self) -> None:
        """Every read in flight lands (preloading, the end of a run)."""
        self.reader.drain()

    def reset_clock(self) -> None:
        self.synchronize()
        super().reset_clock()
        self._t0 = time.perf_counter()

    # -- no device: no copies, no host jobs -----------------------------------
    def copy(self, dst, src, nbytes, name, layer, expert, after=None) -> Event:
        raise RuntimeError(NO_DEVICE)

    def copy_eta(self, nbytes: int, after: Event | None = None) -> float:
        raise RuntimeError(NO_DEVICE)

    def host_eta(self, cost: Cost, act_bytes: int) -> float:
        raise RuntimeError(NO_DEVICE)

    def host_compute(self, x, fn, cost, act_bytes, name, layer=None, expert=None, after=None) -> HostJob:
        raise RuntimeError(NO_DEVICE)

    def host_result(self, job: HostJob) -> torch.Tensor:
        raise RuntimeError(NO_DEVICE)
