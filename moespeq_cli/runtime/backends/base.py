"""The backend interface: streams, events, device memory and a clock.

The runtime speaks CUDA's model of a GPU: a compute stream and a copy stream, each
in order; a copy returns an ``Event``; the compute stream can ``wait`` on an event; device
memory is a budget. ``MockBackend`` implements it on a virtual clock (numerics on the
CPU), ``CudaBackend`` on a real GPU, and ``CpuBackend`` on the CPU alone, where host RAM
is the compute tier and the disk is the slow link (wall clock). The model code never
sees any of them: it asks the expert cache for weights.

Below host RAM is the disk (docs/design.md §9): ``read`` brings an expert's bytes from the
checkpoint's files into a host buffer on the disk "stream" (a pool of I/O threads on the
real backends, a modelled link on the mock) and returns an event like a copy's. Every
transfer takes ``after``: events it must not start before (the slot's last reader, the
read that brings the bytes it copies).

Compute is bracketed: ``begin(name)`` ... run the kernels ... ``end(cost)``. The mock
clock advances by the cost's roofline time at ``end``; CUDA records events at both ends.

The host CPU is a third stream (hybrid execution): ``host_compute(x, fn, ...)`` sends an
expert's activations down the link, computes the expert from its host copy while the GPU
goes on, and sends the output back; ``host_result(job)`` makes the compute stream wait
for it. ``copy_eta`` and ``host_eta`` say when a copy or a host job issued now would
finish (exactly on the mock clock, from the profile's figures on CUDA), so a scheduler
can choose per expert between copying it and computing it on the CPU.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import torch

from moespeq_cli.errors import MoespeqError
from moespeq_cli.runtime.planning.costs import Cost
from moespeq_cli.runtime.planning.hardware import HardwareProfile, format_size
from moespeq_cli.runtime.timeline import Timeline

DISK_GUESS = 1e9  # B/s a read is assumed to take before any has been measured


class DeviceMemoryError(MoespeqError):
    """A device allocation would exceed the memory budget."""


class Event:
    """Completion of a transfer or a job. ``time``: when, on the virtual clock (a
    prediction on the wall-clock backends); ``cuda_event``: a real CUDA event; ``future``:
    work a host thread does first (a read, or issuing a copy after one), None when there
    is none or it is known to be done."""

    __slots__ = ("time", "cuda_event", "future")

    def __init__(self, time: float = 0.0, cuda_event=None, future=None):
        self.time = time
        self.cuda_event = cuda_event
        self.future = future


def as_events(after: Event | list[Event] | None) -> list[Event]:
    if after is None:
        return []
    return [after] if isinstance(after, Event) else [ev for ev in after if ev is not None]


# the compute stream waiting for a resident expert the CPU took to share a layer's work
# (executors/offload.py ``balance``): compute time, not a stall on a transfer
BALANCED = "wait CPU, balanced"
WAIT_CPU = "wait CPU"  # ... for an expert that was not there: stall


class HostJob:
    """An expert computed on the host CPU; ``event`` completes when its output is back on
    the device (its ``time`` is exact on the mock clock, a prediction on CUDA).
    ``balanced``: a resident expert (its wait is compute, not stall)."""

    __slots__ = ("event", "output", "future", "layer", "expert", "balanced")

    def __init__(self, event: Event, output=None, future=None, layer=None, expert=None):
        self.event, self.output, self.future, self.layer, self.expert = event, output, future, layer, expert
        self.balanced = False

    @property
    def waiting(self) -> str:
        """What the compute stream's wait for it is called."""
        return BALANCED if self.balanced else WAIT_CPU


class Backend(ABC):
    name: str
    clock_kind: str  # "virtual" or "wall"
    device: torch.device

    def __init__(self, hw: HardwareProfile | None, capacity: int, reader=None):
        """``reader``: the DiskReader of a disk tier (None: every expert is in host RAM)."""
        self.hw = hw
        self.capacity = capacity
        self.reader = reader
        self.used = 0
        self.allocations: dict[str, int] = {}
        self.timeline = Timeline()
        self.io_stall_s = 0.0
        self.bytes_h2d = 0
        self.bytes_read = 0
        self.phase = "target"  # set to "draft" by the speculative scheduler while drafting

    # -- memory -------------------------------------------------------------
    def alloc(self, nbytes: int, what: str) -> None:
        if self.used + nbytes > self.capacity:
            raise DeviceMemoryError(
                f"out of device memory: {what} needs {format_size(nbytes)} but only "
                f"{format_size(self.capacity - self.used)} of {format_size(self.capacity)} is free; raise --vram or lower the context"
            )
        self.used += nbytes
        self.allocations[what] = self.allocations.get(what, 0) + nbytes

    def free(self, nbytes: int, what: str) -> None:
        self.used -= nbytes
        self.allocations[what] -= nbytes

    # -- streams ------------------------------------------------------------
    @abstractmethod
    def now(self) -> float:
        """The compute stream's current time (virtual), or seconds since start (wall)."""

    @abstractmethod
    def begin(self) -> object: ...

    @abstractmethod
    def end(
        self,
        token: object,
        cost: Cost,
        name: str,
        layer: int | None = None,
        expert: int | None = None,
        stream: str = "compute",
    ) -> None: ...

    @abstractmethod
    def copy(
        self,
        dst: torch.Tensor | None,
        src: torch.Tensor,
        nbytes: int,
        name: str,
        layer: int,
        expert: int,
        after: Event | list[Event] | None = None,
    ) -> Event:
        """Copy host ``src`` into device ``dst`` on the copy stream, once every ``after``
        event (the slot's last use, the read bringing ``src``) has passed; returns the
        copy's completion event."""

    @abstractmethod
    def read(
        self,
        dst: torch.Tensor,
        what,
        nbytes: int,
        name: str,
        layer: int,
        expert: int,
        after: Event | list[Event] | None = None,
    ) -> Event:
        """Read an expert (``what``: its ``Placement``, or extents) from the checkpoint's
        files into host slot ``dst`` on the disk stream, once every ``after`` event has
        passed; returns the read's completion."""

    def disk_bandwidth(self) -> float | None:
        """What the reads so far achieved while the disk was busy (B/s; None before any)."""
        return self.reader.bandwidth() if self.reader is not None else None

    def read_seconds(self, nbytes: int) -> float:
        """What one read of ``nbytes`` is expected to take: the profile's disk figures, else
        what this run's reads have achieved, else an assumed 1 GB/s until they have."""
        hw = self.hw
        if hw is not None and hw.disk_bandwidth is not None and hw.disk_latency is not None:
            return hw.disk_latency + nbytes / hw.disk_bandwidth
        return nbytes / (self.disk_bandwidth() or DISK_GUESS)

    def read_eta(self, nbytes: int) -> float:
        """When a read of ``nbytes`` issued now would complete (``Event.time`` units)."""
        raise NotImplementedError

    @abstractmethod
    def wait(self, event: Event, layer: int | None = None, expert: int | None = None, what: str = "wait H2D") -> None:
        """Make the compute stream wait for ``event``; time spent waiting is I/O stall."""

    @abstractmethod
    def ready(self, event: Event) -> bool:
        """Whether the event has completed by the compute stream's current time."""

    def failed(self, event: Event) -> bool:
        """Whether the host work behind ``event`` (a read, a copy issued after one, a host
        job) ended in an error or was cancelled."""
        f = event.future
        return f is not None and f.done() and (f.cancelled() or f.exception() is not None)

    @abstractmethod
    def record_release(self) -> Event:
        """An event at the compute stream's current position (a slot's last reader)."""

    # -- the host stream and the choice between copy and CPU ---------------------
    @abstractmethod
    def copy_eta(self, nbytes: int, after: Event | None = None) -> float:
        """When a copy of ``nbytes`` issued now would complete (in ``Event.time`` units)."""

    @abstractmethod
    def host_eta(self, cost: Cost, act_bytes: int) -> float:
        """When a host job issued now would have its output back on the device."""

    @abstractmethod
    def host_compute(
        self, x: torch.Tensor, fn, cost: Cost, act_bytes: int, name: str, layer=None, expert=None, after=None
    ) -> HostJob:
        """Run ``fn(x_on_host)`` on the CPU once ``after`` (the read bringing the expert
        into host RAM) has passed; the output returns to the device."""

    @abstractmethod
    def host_result(self, job: HostJob) -> torch.Tensor:
        """Make the compute stream wait for a host job; the wait counts as stall, except a
        balanced job's (``BALANCED``)."""

    def begin_pass(self) -> None:  # noqa: B027 - only the mock counts what a pass dispatches
        """A forward pass starts (the mock counts the ops it dispatches)."""

    def end_pass(self) -> None:  # noqa: B027
        """The forward pass ends (the mock charges the ops no region claimed)."""

    def sync(self, n: int = 1, what: str = "sync") -> None:  # noqa: B027 - real backends really wait
        """The code reads ``n`` values back from the device here (the mock charges it)."""

    def now_event_time(self) -> float:
        """The compute stream's position in ``Event.time`` units."""
        return self.now()

    def groups(self, act_dtype: torch.dtype, compute_dtype: torch.dtype) -> bool:
        """Whether a layer's experts computed in ``act_dtype`` (really ``compute_dtype``
        here) take one grouped call (executors/grouped.py) rather than one expert at a time."""
        from moespeq_cli.runtime.executors.grouped import supported

        return supported(self.device, compute_dtype)

    def upload(self, values: list[int]) -> torch.Tensor:
        """Small index lists the host built (a grouped computation's layout) as an int32
        tensor on the device, without waiting for the device (cuda: one asynchronous copy
        from pinned memory on the compute stream)."""
        return torch.tensor(values, dtype=torch.int32)

    def uncounted(self):
        """A block whose work is the simulation's own, not the device's (the mock computing
        a bf16 GPU's experts in float32 widens them first): the mock does not count its ops."""
        return contextlib.nullcontext()

    def reset_clock(self) -> None:
        """Start generation timing from zero (after weights are loaded)."""
        self.timeline.clear()
        self.io_stall_s = 0.0
        self.bytes_h2d = 0
        self.bytes_read = 0

    def close(self) -> None:
        """Stop the backend's threads (the disk reader's too)."""
        if self.reader is not None:
            self.reader.close()

    def synchronize(self) -> None:  # noqa: B027 - nothing to wait for on a virtual clock
        """Block until all queued device work is done."""

    def resolve_stalls(self) -> None:  # noqa: B027 - the mock and cpu count stalls as they happen
        """Bring ``io_stall_s`` up to date with every stall that has completed, without a
        synchronisation of its own. The scheduler calls it at the start and end of each
        cycle, so the governor sees the cycle's stall (on CUDA stalls are timed by events
        that are only known once the GPU has passed them)."""

    def finalize_timeline(self) -> None:  # noqa: B027 - the mock records intervals directly
        """Resolve pending interval timestamps (CUDA events) into the timeline."""
