"""HostRegistry: host memory page-locked in place for the GPU, exactly its size.

Copies from pageable memory to a GPU are staged through a driver buffer and run at a
fraction of the link's speed (measured on an H200: 18.5 GB/s pageable, 55.4 GB/s
pinned); only page-locked ("pinned") memory is copied asynchronously at full speed.
torch's pinned allocator (``pin_memory()``) rounds every buffer up to a power of two: a
2.8 GB Mixtral layer would lock 4 GiB. moespeq instead allocates the host tier as ordinary
page-aligned mappings of exactly the bytes the plan counts and registers each one in place
with ``cudaHostRegister``.

A registration outlives the memory unless it is undone: once a mapping is unmapped, the
next mapping the kernel places at the same address cannot be registered ("part or all of
the requested memory range is already mapped"; seen on the first GPU run, where every
engine after the first in a process failed). So each registration is undone exactly once,
whichever comes first:

- ``close()``: the backend closes (after its last copy has completed);
- the memory goes: an engine dropped without ``close()``. Only memory held by a
  ``PageMapping`` (tiers/disk.py, the host tier's) is registered: its ``on_free``
  callbacks run once no tensor views it and *before* it is unmapped (a weakref callback
  would run after the unmap, or, on a tensor, while views of it still live); the GPU is
  synchronised first, since a copy may still be reading it.

A registration or unregistration that fails leaves CUDA's per-thread "last error" set,
and torch would report it at the next kernel launch as that kernel's failure; it is
cleared here, and the failure is raised (registration) or warned about (unregistration).
"""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Callable

import torch


def clear_last_error(cudart=None) -> None:
    """Reset the CUDA runtime's last error on this thread (best effort): through the
    binding when it has ``cudaGetLastError``, else through the runtime library torch
    loaded (found in this process's mappings)."""
    fn = getattr(cudart, "cudaGetLastError", None)
    if fn is not None:
        fn()
        return
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "libcudart" in line and line.split()[-1].startswith("/")})
    except OSError:  # no /proc: nothing more to do
        return
    for lib in libs:
        try:
            ctypes.CDLL(lib).cudaGetLastError()
        except (OSError, AttributeError):  # a deleted or foreign file, or no such symbol: the next one
            continue


class HostRegistry:
    """The host memory one backend registered; ``register`` each block, ``close`` once."""

    def __init__(self, cudart=None, synchronize: Callable[[], None] | None = None):
        self.cudart = cudart if cudart is not None else torch.cuda.cudart()
        self.synchronize = synchronize if synchronize is not None else torch.cuda.synchronize
        self._live: dict[int, int] = {}  # pointer -> bytes registered there
        self.bytes = 0  # registered now

    def register(self, block: torch.Tensor, owner) -> None:
        """Page-lock ``block``'s bytes in place; the registration is undone at ``close``
        or when ``owner``, the ``PageMapping`` holding the memory, is freed."""
        hooks = getattr(owner, "on_free", None)
        if hooks is None:
            raise TypeError("only memory held by a PageMapping (tiers/disk.py aligned_bytes) can be registered")
        ptr, nbytes = block.data_ptr(), block.numel() * block.element_size()
        rc = int(self.cudart.cudaHostRegister(ptr, nbytes, 0))
        if rc != 0:
            clear_last_error(self.cudart)
            why = getattr(self.cudart, "cudaGetErrorString", str)(rc)
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed ({why}); lower --ram")
        self._live[ptr] = nbytes
        self.bytes += nbytes
        hooks.append(lambda: self._unregister(ptr))

    def _unregister(self, ptr: int) -> None:
        nbytes = self._live.pop(ptr, None)
        if nbytes is None:  # undone already (close, then the memory going)
            return
        try:
            self.synchronize()  # no copy may still be reading the memory
        finally:
            rc = int(self.cudart.cudaHostUnregister(ptr))
            self.bytes -= nbytes
            if rc != 0:
                clear_last_error(self.cudart)
                warnings.warn(f"cudaHostUnregister of {nbytes} bytes failed (error {rc})", RuntimeWarning, stacklevel=2)

    def close(self) -> None:
        """Undo every registration still held; each is tried even if another fails."""
        failed: BaseException | None = None
        for ptr in list(self._live):
            try:
                self._unregister(ptr)
            except Exception as e:  # noqa: BLE001 - the rest are still undone; the first failure is raised
                failed = failed or e
        if failed is not None:
            raise failed
