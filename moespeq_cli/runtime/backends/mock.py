"""MockBackend: a GPU simulated on a virtual clock, numerics really run on the CPU.

A discrete-event model with CUDA semantics: one compute stream and one copy stream, each
in order; a copy is issued at the compute stream's current time (the host enqueues it
when the program reaches that point), starts when the copy stream is free and the slot's
previous reader has finished, and takes ``link_latency + bytes / link_bandwidth``. A wait
moves the compute stream to the event's time; the gap is recorded as a stall. Compute
advances the compute stream by the roofline cost of the operation (costs.py). Device
memory is a counted budget. Everything is deterministic: the same run gives the same
timeline. docs/mock-backend.md has the formulas and the limits.
"""

from __future__ import annotations

import torch

from moespeq_cli.runtime.backends.base import Backend, Event
from moespeq_cli.runtime.costs import Cost
from moespeq_cli.runtime.hardware import HardwareProfile
from moespeq_cli.runtime.timeline import Interval


class MockBackend(Backend):
    name = "mock"
    clock_kind = "virtual"
    device = torch.device("cpu")

    def __init__(self, hw: HardwareProfile, capacity: int):
        super().__init__(hw, capacity)
        self.t_compute = 0.0
        self.t_copy = 0.0
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

    def copy(self, dst, src, nbytes, name, layer, expert, after: Event | None = None) -> Event:
        start = max(self.t_copy, self.t_compute, after.time if after is not None else 0.0)
        self.t_copy = start + self.hw.link_latency + nbytes / self.hw.link_bandwidth
        self.bytes_h2d += nbytes
        self._record("copy", "copy", name, start, self.t_copy, layer, expert, nbytes)
        return Event(self.t_copy)

    def wait(self, event: Event, layer=None, expert=None) -> None:
        if event.time > self.t_compute:
            self._record("compute", "stall", "wait H2D", self.t_compute, event.time, layer, expert)
            self.io_stall_s += event.time - self.t_compute
            self.t_compute = event.time

    def ready(self, event: Event) -> bool:
        return event.time <= self.t_compute

    def record_release(self) -> Event:
        return Event(self.t_compute)

    def reset_clock(self) -> None:
        super().reset_clock()
        self.origin = self.t_compute = self.t_copy = max(self.t_compute, self.t_copy)
