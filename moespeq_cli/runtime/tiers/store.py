"""ExpertStore: every routed expert in memory, one contiguous buffer per expert (its parts
as stored, flattened end to end: gate | up | down for most families,
models/expert_format.py).

It is the ``cpu`` backend's reference for a model whose experts all fit in RAM
(``InMemoryExperts``, executors/experts.py) and the tests' oracle for the other tiers'
bytes. The offloading runtime's host RAM is not this: it is an ``ExpertCache`` of slots
filled by reads from disk (tiers/hierarchy.py), in page-aligned blocks that CUDA
page-locks in place, exactly their size (backends/host_registry.py)."""

from __future__ import annotations

import contextlib
import math

import torch

from moespeq_cli.errors import CheckpointError
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.models.expert_format import aligned, views_at
from moespeq_cli.runtime.tiers.disk import misaligned


class ExpertStore:
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype):
        """``dtype``: the buffers' dtype (the numerics); a compact format (FP8, MXFP4) is
        kept as its stored bytes."""
        c = self.config = ckpt.config
        ckpt.check_experts()
        fmt = c.expert_format
        self.part_dtypes = fmt.part_dtypes(c.dtype) if fmt.compact else None  # compact: the stored bytes
        # each part's length in the buffer's elements (bytes, for a compact format), end to end
        sizes = [
            math.prod(s) * (d.itemsize if fmt.compact else 1)
            for s, d in zip(c.expert_shapes(), fmt.part_dtypes(c.dtype), strict=True)
        ]
        self._starts = [sum(sizes[:p]) for p in range(len(sizes))]
        if fmt.compact:
            dtype = torch.uint8
            if not aligned(sizes, self.part_dtypes, range(len(sizes))):
                raise CheckpointError(misaligned(ckpt.path))
        self.dtype = dtype
        self.numel = c.expert_bytes(1) if fmt.compact else c.expert_params
        self.nbytes = self.numel * dtype.itemsize
        self.packed: dict[int, torch.Tensor] = {}
        with expert_reader(ckpt, None if fmt.compact else dtype) as read:
            for layer in c.moe_layers:
                buf = torch.empty(c.num_experts, self.numel, dtype=dtype)  # [E, parts]
                for e in range(c.num_experts):
                    pos = 0
                    for part in read(layer, e):
                        flat = part.reshape(-1).view(torch.uint8) if fmt.compact else part.reshape(-1)
                        buf[e, pos : pos + flat.numel()] = flat  # (converted to the buffer's dtype)
                        pos += flat.numel()
                self.packed[layer] = buf

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        return self.packed[layer][expert]

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A packed expert buffer -> its parts (e.g. gate [I, H], up [I, H], down [H, I]) as views."""
        return views_at(flat, self._starts, self.config.expert_shapes(), self.part_dtypes)


@contextlib.contextmanager
def expert_reader(ckpt: Checkpoint, dtype: torch.dtype | None = None):
    """-> read(layer, expert): the expert's parts in the config's order, read past the page
    cache as the disk tier reads them (O_DIRECT into one scratch buffer), as stored.
    Read through the checkpoint's memory map, every expert's pages stayed mapped: a second
    copy of the experts in the process (RssFile) for the whole run. Where the disk tier
    cannot read them (parts of mixed float dtypes, which it refuses), they are read through
    the map, converted to ``dtype`` and checked as ``Checkpoint.expert`` does (an FP8 part
    without its scale is refused there). From a warm page cache this reads more slowly
    than the map (356 MB: 2.5 s against 1.8 s); from the disk, at its speed either way."""
    from moespeq_cli.runtime.tiers.disk import DiskExperts, DiskReader

    try:
        disk = DiskExperts(ckpt)
    except CheckpointError:
        yield lambda layer, e: ckpt.expert(layer, e, dtype)
        return
    scratch = disk.empty_buffer()
    with DiskReader(threads=1) as reader:
        reader.hold(disk.held)
        yield lambda layer, e: disk.views(disk.read((layer, e), scratch, reader))
