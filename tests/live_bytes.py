"""Memory a block of code holds at once, counted at the dispatcher (tests of what the
planner reserves: attention's tiles, a prompt's grouped expert calls)."""

import weakref

import torch


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The most bytes of tensors made while the mode is on alive at once (an op writing
    into a tensor it was given, a copy into an expert slot, makes nothing new)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {
            t.untyped_storage().data_ptr()
            for a in (*args, *(kwargs or {}).values())
            for t in (a if isinstance(a, (list, tuple)) else [a])
            if isinstance(t, torch.Tensor)
        }
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor):
                continue
            ptr, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if size and ptr not in self.seen and ptr not in given:
                self.seen.add(ptr)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t.untyped_storage(), self._free, ptr, size)
        return out

    def _free(self, ptr, size):
        self.seen.discard(ptr)
        self.live -= size
