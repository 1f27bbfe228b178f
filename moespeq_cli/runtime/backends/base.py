"""The backend interface: streams, events, device memory and a clock.

The runtime speaks CUDA's model of a GPU: a compute stream and a copy stream, each
in order; a copy returns an ``Event``; the compute stream can ``wait`` on an event; device
memory is a budget. ``MockBackend`` implements it on a virtual clock (numerics on the
CPU), ``CudaBackend`` on a real GPU. The model code never sees either: it asks the
expert cache for weights.

Compute is bracketed: ``begin(name)`` ... run the kernels ... ``end(cost)``. The mock
clock advances by the cost's roofline time at ``end``; CUDA records events at both ends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from moespeq_cli.errors import MoespeqError
from moespeq_cli.runtime.costs import Cost
from moespeq_cli.runtime.hardware import HardwareProfile, format_size
from moespeq_cli.runtime.timeline import Timeline


class DeviceMemoryError(MoespeqError):
    """A device allocation would exceed the memory budget."""


class Event:
    """Completion of a copy. ``time`` is set on the virtual clock; CUDA holds a real event."""

    __slots__ = ("time", "cuda_event")

    def __init__(self, time: float = 0.0, cuda_event=None):
        self.time = time
        self.cuda_event = cuda_event


class Backend(ABC):
    name: str
    clock_kind: str  # "virtual" or "wall"
    device: torch.device

    def __init__(self, hw: HardwareProfile, capacity: int):
        self.hw = hw
        self.capacity = capacity
        self.used = 0
        self.allocations: dict[str, int] = {}
        self.timeline = Timeline()
        self.io_stall_s = 0.0
        self.bytes_h2d = 0
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
        after: Event | None = None,
    ) -> Event:
        """Copy host ``src`` into device ``dst`` on the copy stream, once ``after`` (the
        slot's last use) has passed; returns the copy's completion event."""

    @abstractmethod
    def wait(self, event: Event, layer: int | None = None, expert: int | None = None) -> None:
        """Make the compute stream wait for ``event``; time spent waiting is I/O stall."""

    @abstractmethod
    def ready(self, event: Event) -> bool:
        """Whether the event has completed by the compute stream's current time."""

    @abstractmethod
    def record_release(self) -> Event:
        """An event at the compute stream's current position (a slot's last reader)."""

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def reset_clock(self) -> None:
        """Start generation timing from zero (after weights are loaded)."""
        self.timeline.clear()
        self.io_stall_s = 0.0
        self.bytes_h2d = 0

    def synchronize(self) -> None:  # noqa: B027 - nothing to wait for on a virtual clock
        """Block until all queued device work is done."""

    def finalize_timeline(self) -> None:  # noqa: B027 - the mock records intervals directly
        """Resolve pending interval timestamps (CUDA events) into the timeline."""
