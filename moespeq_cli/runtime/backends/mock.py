"""MockBackend: a GPU simulated on a virtual clock, numerics really run on the CPU.

A discrete-event model with CUDA semantics: one compute stream and one copy stream, each
in order; a copy is issued at the compute stream's current time (the host enqueues it
when the program reaches that point), starts when the copy stream is free and the slot's
previous reader has finished, and takes ``link_latency + bytes / link_bandwidth``. A wait
moves the compute stream to the event's time; the gap is recorded as a stall. Compute
advances the compute stream by the roofline cost of the operation (planning/costs.py). The host
CPU is a third in-order stream: a host job's activations leave when the compute stream
reaches it (``link_latency + bytes / link_bandwidth``), the CPU computes the expert at its
host roofline cost once it is free, and the output comes back the same way. The disk is
a fourth: a read is issued at the compute stream's time, starts when the disk is free
and its host slot's readers are done, and takes ``disk_latency + bytes /
disk_bandwidth``; its bytes are really read (the numerics need them), at once. Device
memory is a counted budget whose slots are real buffers: a copy really copies. Everything
is deterministic: the same run gives the same timeline. docs/mock-backend.md has the
formulas and the limits.
"""

from __future__ import annotations

import torch

from moespeq_cli.runtime.backends.base import Backend, Event, HostJob, as_events
from moespeq_cli.runtime.planning.costs import Cost, transfer_seconds
from moespeq_cli.runtime.planning.hardware import HardwareProfile
from moespeq_cli.runtime.timeline import Interval


class MockBackend(Backend):
    name = "mock"
    clock_kind = "virtual"
    device = torch.device("cpu")

    def __init__(self, hw: HardwareProfile, capacity: int, reader=None):
        super().__init__(hw, capacity, reader)
        self.t_compute = 0.0
        self.t_copy = 0.0
        self.t_host = 0.0
        self.t_disk = 0.0
        self.origin = 0.0  # generation starts here; earlier work (preloading) is complete

    def now(self) -> float:
        return self.t_compute - self.origin

    def begin(self) -> float:
        return self.t_compute

    def end(self, token, cost: Cost, name: str, layer=None, expert=None, stream: str = "compute") -> None:
        start = self.t_compute
        self.t_compute = start + cost.seconds(self.hw)
        self._record(stream, "compute", name, start, self.t_compute, layer, expert)

    def _record(self, stream, kind, name, start, end, layer=None, expert=None, nbytes=0) -> None:
        o = self.origin
        self.timeline.add(Interval(stream, kind, name, start - o, end - o, layer, expert, nbytes, self.phase))

    @staticmethod
    def _after(after) -> float:
        return max((ev.time for ev in as_events(after)), default=0.0)

    def _copy_window(self, nbytes: int, after) -> tuple[float, float]:
        start = max(self.t_copy, self.t_compute, self._after(after))
        return start, start + transfer_seconds(nbytes, self.hw)

    def copy_eta(self, nbytes: int, after: Event | None = None) -> float:
        return self._copy_window(nbytes, after)[1]

    def copy(self, dst, src, nbytes, name, layer, expert, after=None) -> Event:
        start, self.t_copy = self._copy_window(nbytes, after)
        if dst is not None:
            dst.copy_(src)
        self.bytes_h2d += nbytes
        self._record("copy", "copy", name, start, self.t_copy, layer, expert, nbytes)
        return Event(self.t_copy)

    def _read_window(self, nbytes: int, after) -> tuple[float, float]:
        start = max(self.t_disk, self.t_compute, self._after(after))
        if self.hw.disk_bandwidth is None:  # only when every expert fits in RAM: the reads at load
            return start, start
        return start, start + self.hw.disk_latency + nbytes / self.hw.disk_bandwidth

    def read_eta(self, nbytes: int) -> float:
        return self._read_window(nbytes, None)[1]

    def read(self, dst, what, nbytes, name, layer, expert, after=None) -> Event:
        start, self.t_disk = self._read_window(nbytes, after)
        self.reader.read(what, dst)
        self.bytes_read += nbytes
        self._record("disk", "read", name, start, self.t_disk, layer, expert, nbytes)
        return Event(self.t_disk)

    def _host_window(self, cost: Cost, act_bytes: int, after=None) -> tuple[float, float, float]:
        """(CPU starts, CPU done, output back on the device)."""
        start = max(self.t_host, self.t_compute + transfer_seconds(act_bytes, self.hw), self._after(after))
        done = start + cost.host_seconds(self.hw)
        return start, done, done + transfer_seconds(act_bytes, self.hw)

    def host_eta(self, cost: Cost, act_bytes: int) -> float:
        return self._host_window(cost, act_bytes)[2]

    def host_compute(
        self, x, fn, cost: Cost, act_bytes: int, name: str, layer=None, expert=None, after=None
    ) -> HostJob:
        start, self.t_host, back = self._host_window(cost, act_bytes, after)
        self._record("host", "compute", name, start, self.t_host, layer, expert)
        return HostJob(Event(back), fn(x), layer=layer, expert=expert)

    def host_result(self, job: HostJob):
        self.wait(job.event, job.layer, job.expert, what="wait CPU")
        return job.output

    def now_event_time(self) -> float:
        return self.t_compute

    def wait(self, event: Event, layer=None, expert=None, what: str = "wait H2D") -> None:
        if event.time > self.t_compute:
            self._record("compute", "stall", what, self.t_compute, event.time, layer, expert)
            self.io_stall_s += event.time - self.t_compute
            self.t_compute = event.time

    def ready(self, event: Event) -> bool:
        return event.time <= self.t_compute

    def record_release(self) -> Event:
        return Event(self.t_compute)

    def reset_clock(self) -> None:
        super().reset_clock()
        start = max(self.t_compute, self.t_copy, self.t_host, self.t_disk)
        self.origin = self.t_compute = self.t_copy = self.t_host = self.t_disk = start
