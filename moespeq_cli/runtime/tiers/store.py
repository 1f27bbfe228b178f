"""ExpertStore: the host copy of every routed expert, one contiguous buffer per expert
(its parts as stored, flattened end to end: gate | up | down for most families,
models/expert_format.py), so that moving an expert is one copy. Pinned on CUDA so
copies can run asynchronously at full link speed."""

from __future__ import annotations

import math

import torch

from moespeq_cli.models.checkpoint import Checkpoint


class ExpertStore:
    def __init__(
        self, ckpt: Checkpoint, dtype: torch.dtype, pin: bool = False, storage_dtype: torch.dtype | None = None
    ):
        """``dtype``: the buffers' dtype (the numerics); ``storage_dtype``: the dtype the
        device holds, which sets the bytes a copy moves (the mock computes in float32 while
        simulating a bf16 GPU)."""
        c = self.config = ckpt.config
        ckpt.check_experts()
        self.dtype = dtype
        self.storage_dtype = storage_dtype or dtype
        self.numel = c.expert_params
        self.nbytes = self.numel * torch.empty(0, dtype=self.storage_dtype).element_size()
        self.packed: dict[int, torch.Tensor] = {}
        for layer in c.moe_layers:
            buf = torch.empty(c.num_experts, self.numel, dtype=dtype, pin_memory=pin)  # [E, parts]
            for e in range(c.num_experts):
                pos = 0
                for part in ckpt.expert(layer, e, dtype):
                    buf[e, pos : pos + part.numel()] = part.reshape(-1)
                    pos += part.numel()
            self.packed[layer] = buf

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        return self.packed[layer][expert]

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A packed expert buffer -> its parts (e.g. gate [I, H], up [I, H], down [H, I]) as views."""
        return part_views(flat, self.config.expert_shapes())


def part_views(flat: torch.Tensor, shapes) -> tuple[torch.Tensor, ...]:
    """``flat`` cut into consecutive views of ``shapes``."""
    out, pos = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[pos : pos + n].view(shape))
        pos += n
    return tuple(out)

    @property
    def total_bytes(self) -> int:
        return self.nbytes * self.config.num_experts * len(self.config.moe_layers)
