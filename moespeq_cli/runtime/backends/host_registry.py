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
- the memory's owner is collected: an engine dropped without ``close()``; the GPU is
  synchronised first, since a copy may still be reading the memory.

A registration that fails leaves CUDA's per-thread "last error" set, and torch would
report it at the next kernel launch as that kernel's failure; it is cleared here, and the
failure is raised as what it is.
"""

from __future__ import annotations

import ctypes
import weakref
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
            libs = {line.split()[-1] for line in f if "libcudart" in line}
        for lib in libs:
            ctypes.CDLL(lib).cudaGetLastError()
    except OSError:  # no /proc, or the library would not load: nothing more to do
        pass


class HostRegistry:
    """The host memory one backend registered; ``register`` each block, ``close`` once."""

    def __init__(self, cudart=None, synchronize: Callable[[], None] | None = None):
        self.cudart = cudart if cudart is not None else torch.cuda.cudart()
        self.synchronize = synchronize if synchronize is not None else torch.cuda.synchronize
        self._live: dict[int, weakref.finalize] = {}  # pointer -> its undo
        self.bytes = 0  # registered now

    def register(self, block: torch.Tensor, owner: object | None = None) -> None:
        """Page-lock ``block``'s bytes in place; the registration is undone at ``close``
        or when ``owner`` (the object whose collection frees the memory: its mapping;
        default the block) is collected."""
        ptr, nbytes = block.data_ptr(), block.numel() * block.element_size()
        rc = int(self.cudart.cudaHostRegister(ptr, nbytes, 0))
        if rc != 0:
            clear_last_error(self.cudart)
            why = getattr(self.cudart, "cudaGetErrorString", str)(rc)
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed ({why}); lower --ram")
        undo = weakref.finalize(owner if owner is not None else block, self._unregister, ptr, nbytes)
        undo.atexit = False  # the process's exit releases it anyway; CUDA may be gone by then
        self._live[ptr] = undo
        self.bytes += nbytes

    def _unregister(self, ptr: int, nbytes: int) -> None:
        if self._live.pop(ptr, None) is None:
            return
        self.synchronize()  # no copy may still be reading the memory
        self.cudart.cudaHostUnregister(ptr)
        self.bytes -= nbytes

    def close(self) -> None:
        for undo in list(self._live.values()):
            undo()  # runs _unregister at most once per registration
