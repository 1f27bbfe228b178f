"""Backends: where compute runs and how time is measured. See base.py for the interface."""

from __future__ import annotations

from moespeq_cli.errors import MoespeqError, UsageError
from moespeq_cli.runtime.backends.base import Backend, DeviceMemoryError, Event
from moespeq_cli.runtime.planning.hardware import HardwareProfile

BACKEND_NAMES = ("auto", "cuda", "mock", "cpu")


def resolve_backend_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise UsageError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "mock"
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():  # a runtime failure: the command is right, the machine lacks the GPU
            raise MoespeqError("--backend cuda needs a visible CUDA GPU; use --backend mock to simulate one")
    return name


def make_backend(name: str, hw: HardwareProfile | None, capacity: int, reader=None) -> Backend:
    """``reader``: the disk tier's DiskReader; ``capacity``: the memory budget of the
    compute tier (the device's; host RAM's on the cpu backend)."""
    if name == "mock":
        from moespeq_cli.runtime.backends.mock import MockBackend

        return MockBackend(hw, capacity, reader)
    if name == "cuda":
        from moespeq_cli.runtime.backends.cuda import CudaBackend

        return CudaBackend(hw, capacity, reader)
    if name == "cpu":
        from moespeq_cli.runtime.backends.cpu import CpuBackend

        return CpuBackend(capacity, reader)
    raise ValueError(f"no offloading backend {name!r}")


def library_bytes(name: str, hw: HardwareProfile | None) -> int:
    """What the device's BLAS libraries hold for the compute stream beside the plan's own
    buffers, on backend ``name``: measured on cuda (``blas_workspace_bytes``), the
    profile's ``blas_workspace`` on the mock (a GPU it simulates), nothing on the cpu."""
    if name == "cuda":
        import torch

        from moespeq_cli.runtime.backends.cuda import blas_workspace_bytes

        return blas_workspace_bytes(torch.device("cuda", torch.cuda.current_device()))
    if name == "mock" and hw is not None and hw.kind != "cpu":
        return hw.blas_workspace
    return 0


__all__ = [
    "Backend",
    "DeviceMemoryError",
    "Event",
    "make_backend",
    "library_bytes",
    "resolve_backend_name",
    "BACKEND_NAMES",
]
