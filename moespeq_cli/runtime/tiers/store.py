"""ExpertStore: the host copy of every routed expert, one contiguous buffer per expert
(gate | up | down, flattened), so that moving an expert is one copy. Pinned on CUDA so
copies can run asynchronously at full link speed."""

from __future__ import annotations

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
        h, i = c.hidden_size, c.expert_intermediate
        self.numel = 3 * h * i
        self.nbytes = self.numel * torch.empty(0, dtype=self.storage_dtype).element_size()
        self.packed: dict[int, torch.Tensor] = {}
        for layer in c.moe_layers:
            buf = torch.empty(c.num_experts, self.numel, dtype=dtype, pin_memory=pin)  # [E, 3*I*H]
            for e in range(c.num_experts):
                gate, up, down = ckpt.expert(layer, e, dtype)
                buf[e, : h * i] = gate.reshape(-1)
                buf[e, h * i : 2 * h * i] = up.reshape(-1)
                buf[e, 2 * h * i :] = down.reshape(-1)
            self.packed[layer] = buf

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        return self.packed[layer][expert]

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A packed expert buffer -> (gate [I, H], up [I, H], down [H, I]) views."""
        h, i = self.config.hidden_size, self.config.expert_intermediate
        return flat[: h * i].view(i, h), flat[h * i : 2 * h * i].view(i, h), flat[2 * h * i :].view(h, i)

    @property
    def total_bytes(self) -> int:
        return self.nbytes * self.config.num_experts * len(self.config.moe_layers)
