"""Counting the operations the code really dispatches.

The mock backend prices every region of a forward pass by the ops it launched, not by a
hand-kept constant per module (docs/design.md §9: a simulator prices the code that runs). An
``OpCounter`` is a dispatch mode: every aten op the Python code calls passes through it
and is counted as

- a **launch** (a kernel on a GPU, a framework dispatch on a CPU), unless
- it is a **view**: its schema aliases its input (``view``, ``slice``, ``select``, ``t``,
  ...) and its result shares its input's memory, so it launches nothing (counted apart);
  an aliasing op that did copy (``to`` that converted, ``reshape`` of a non-contiguous
  tensor) is a launch;
- and, when it brings a value back to the host (``item``), also a **sync**.

With ``count_bytes`` it also adds up the **bytes** each launch reads and writes (its
tensor operands and results, as large as they are): the memory traffic of elementwise
work such as dequantizing weights, which a matmul's roofline does not see.

The counter sees the ops the Python code calls (``aten.linear``, not the ``addmm`` inside
it): one launch each, which is what an eager GPU run launches per call site too.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# reads of a value to the host: ``item()``, ``int()``/``float()`` of a tensor, and ``bool()`` (is_nonzero)
SYNC_OPS = {"aten.item.default", "aten._local_scalar_dense.default", "aten.is_nonzero.default"}
METADATA_OPS = {"aten.detach_.default"}  # in place on a tensor's metadata: nothing launched


# conversions: a copy into a tensor of another dtype (``widened``'s scratch) is one too
CAST_OPS = {"aten.to.dtype", "aten.to.dtype_layout", "aten._to_copy.default", "aten.to.other", "aten.copy_.default"}


class OpCounter(TorchDispatchMode):
    """``skip_casts``: dtype conversions are not counted (the mock computes a bf16 GPU's
    work in float32 on the CPU: its casts would not run on the GPU). While ``paused`` (the
    mock's own bookkeeping: its copies, its reads) ops are counted apart as ``internal``."""

    def __init__(self, skip_casts: bool = False, count_bytes: bool = False):
        super().__init__()
        self.skip_casts = skip_casts
        self.count_bytes = count_bytes
        self.bytes = 0
        self.ops = 0
        self.views = 0
        self.syncs = 0
        self.casts = 0
        self.internal = 0
        self.paused = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in dynamo.disable unless this says no,
        # and that wrapper imports torch._dynamo on first use (1.3 s on this machine, paid
        # before the demo's first token). Nothing is ever compiled inside this counter.
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if self.paused:
            self.internal += 1
        elif (func.is_view and _shares_memory(out, args)) or name in METADATA_OPS:
            self.views += 1
        elif self.skip_casts and name in CAST_OPS and _changes_dtype(out, args):
            self.casts += 1
        else:
            self.ops += 1
            if name in SYNC_OPS:
                self.syncs += 1
            if self.count_bytes and not name.startswith("aten.empty"):  # allocating moves nothing
                # operands read, results written (an ``out=`` tensor is the result: once; an
                # in-place op's operand is read and written: twice)
                written = 0 if "out" in (kwargs or {}) else _nbytes(out)
                self.bytes += _nbytes(args) + _nbytes(kwargs) + written
        return out


def _nbytes(tree) -> int:
    from torch.utils._pytree import tree_leaves

    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


def _changes_dtype(out, args) -> bool:
    """The result's dtype is not its source's (``copy_(dst, src)``: the second operand's)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    src = tensors[1] if len(tensors) > 1 and out is tensors[0] else (tensors[0] if tensors else None)
    return isinstance(out, torch.Tensor) and src is not None and out.dtype != src.dtype


def _shares_memory(out, args) -> bool:
    src = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if src is None or not isinstance(out, torch.Tensor):
        return True
    try:
        return out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # storage-less tensors (meta, fake)
        return True


def count_ops(fn, *args, **kwargs):
    """Run ``fn`` as the model runs (in inference mode) and count what it dispatches:
    -> (its result, the OpCounter)."""
    with torch.inference_mode(), OpCounter() as counter:
        out = fn(*args, **kwargs)
    return out, counter


class HostSyncCounter:
    """Counts the host's reads of device values that do not pass the dispatcher while
    active: ``tolist()``, ``torch.tensor(data, device=...)`` (a blocking copy from
    pageable memory) and indexing with a Python list (``x[rows]``: the list copied to the
    device from pageable memory, the same copy). ``item()`` and ``int()``/``float()``/``bool()`` of a tensor do pass it
    (``_local_scalar_dense``): ``OpCounter.syncs`` counts those. On a GPU each of these
    waits for the device to reach that point; on the CPU they cost nothing, so they are
    counted where the code makes them. ``total`` and ``by_kind``; not reentrant."""

    def __init__(self):
        self.by_kind = {"tolist": 0, "tensor": 0, "list_index": 0}
        self._saved: tuple = ()

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def __enter__(self) -> HostSyncCounter:
        tolist, tensor, getitem = torch.Tensor.tolist, torch.tensor, torch.Tensor.__getitem__
        self._saved = (tolist, tensor, getitem, "__getitem__" in torch.Tensor.__dict__)
        by_kind = self.by_kind

        def counted_getitem(t, index):
            if isinstance(index, list) or (isinstance(index, tuple) and any(isinstance(i, list) for i in index)):
                by_kind["list_index"] += 1
            return getitem(t, index)

        def counted_tolist(t):
            by_kind["tolist"] += 1
            return tolist(t)

        def counted_tensor(data, *args, **kwargs):
            if kwargs.get("device") is not None:
                by_kind["tensor"] += 1
            return tensor(data, *args, **kwargs)

        torch.Tensor.tolist, torch.tensor, torch.Tensor.__getitem__ = counted_tolist, counted_tensor, counted_getitem
        return self

    def __exit__(self, *exc) -> None:
        torch.Tensor.tolist, torch.tensor, getitem, own = self._saved
        if own:
            torch.Tensor.__getitem__ = getitem
        else:  # inherited (torch._C.TensorBase's): the class's own attribute goes again
            del torch.Tensor.__getitem__
