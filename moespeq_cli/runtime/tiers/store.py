"""ExpertStore: the host copy of every routed expert, one contiguous buffer per expert
(its parts as stored, flattened end to end: gate | up | down for most families,
models/expert_format.py), so that moving an expert is one copy. Pinned on CUDA so
copies can run asynchronously at full link speed."""

from __future__ import annotations

import math

import torch

from moespeq_cli.errors import CheckpointError
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.models.expert_format import aligned, views_at
from moespeq_cli.runtime.tiers.disk import misaligned


class ExpertStore:
    def __init__(
        self, ckpt: Checkpoint, dtype: torch.dtype, pin: bool = False, storage_dtype: torch.dtype | None = None
    ):
        """``dtype``: the buffers' dtype (the numerics); ``storage_dtype``: the dtype the
        device holds, which sets the bytes a copy moves (the mock computes in float32 while
        simulating a bf16 GPU)."""
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
            dtype = storage_dtype = torch.uint8
            if not aligned(sizes, self.part_dtypes, range(len(sizes))):
                raise CheckpointError(misaligned(ckpt.path))
        self.dtype = dtype
        self.storage_dtype = storage_dtype or dtype
        self.numel = c.expert_bytes(1) if fmt.compact else c.expert_params
        self.nbytes = self.numel * torch.empty(0, dtype=self.storage_dtype).element_size()
        self.packed: dict[int, torch.Tensor] = {}
        for layer in c.moe_layers:
            buf = torch.empty(c.num_experts, self.numel, dtype=dtype, pin_memory=pin)  # [E, parts]
            for e in range(c.num_experts):
                pos = 0
                for part in ckpt.expert(layer, e, None if fmt.compact else dtype):
                    flat = part.reshape(-1).view(torch.uint8) if fmt.compact else part.reshape(-1)
                    buf[e, pos : pos + flat.numel()] = flat
                    pos += flat.numel()
            self.packed[layer] = buf

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        return self.packed[layer][expert]

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A packed expert buffer -> its parts (e.g. gate [I, H], up [I, H], down [H, I]) as views."""
        return views_at(flat, self._starts, self.config.expert_shapes(), self.part_dtypes)

    @property
    def total_bytes(self) -> int:
        return self.nbytes * self.config.num_experts * len(self.config.moe_layers)
