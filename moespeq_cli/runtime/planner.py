"""The VRAM planner: what lives on the device, and how many expert slots are left.

Budget = non-expert weights (attention, norms, routers, shared experts, dense layers,
embeddings, LM head; full precision) + the KV cache for the requested context +
activation workspace + N full-precision expert slots. The planner works from the model's
shapes alone (a model on the meta device), so an impossible budget is refused before any
weight is read, with what it needs and what to change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moespeq_cli.errors import UsageError
from moespeq_cli.models.base import CausalLM
from moespeq_cli.models.config import MoEConfig
from moespeq_cli.runtime.costs import elem_size
from moespeq_cli.runtime.hardware import format_size


@dataclass
class Plan:
    policy: str
    budget_bytes: int
    non_expert_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    expert_bytes: int  # one full-precision routed expert
    total_experts: int
    slots: int
    context_tokens: int
    draft_bytes: int = 0  # the 4-bit draft's routed experts (moespeq)
    note: str | None = None  # what the planner decided that the user should know

    @property
    def fixed_bytes(self) -> int:
        return self.non_expert_bytes + self.kv_cache_bytes + self.workspace_bytes + self.draft_bytes

    @property
    def slot_bytes(self) -> int:
        return self.slots * self.expert_bytes

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.fixed_bytes - self.slot_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            fixed_bytes=self.fixed_bytes,
            slot_bytes=self.slot_bytes,
            resident_fraction=round(self.slots / self.total_experts, 4) if self.total_experts else 1.0,
        )
        return d

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("non-expert weights", self.non_expert_bytes),
            ("KV cache", self.kv_cache_bytes),
            ("workspace", self.workspace_bytes),
            (f"expert slots ({self.slots} of {self.total_experts})", self.slot_bytes),
            ("unused", self.free_bytes),
        ]


def kv_bytes_per_token(model: CausalLM, elem: int) -> int:
    total = 0
    for layer in model.model.layers:
        _, kv_heads, dk, dv = layer.self_attn.kv_dims()
        total += kv_heads * (dk + dv) * elem
    return total


def draft_bytes_estimate(cfg: MoEConfig, blocksize: int = 64) -> int:
    """4-bit routed experts: half a byte per weight plus one fp32 absmax per block."""
    per_expert = cfg.expert_params // 2 + (cfg.expert_params // blocksize) * 4
    return per_expert * cfg.num_experts * len(cfg.moe_layers)


def make_plan(
    model: CausalLM, cfg: MoEConfig, dtype: torch.dtype, budget: int, context: int, policy: str, blocksize: int = 64
) -> Plan:
    """``model`` may live on the meta device: only shapes are read. For moespeq the 4-bit
    draft is placed too; when it does not fit beside top_k expert slots the plan runs
    without it (k = 0, gate-prefetch decoding) and says so in ``note``."""
    elem = elem_size(dtype)
    non_expert = sum(p.numel() for p in model.parameters()) * elem
    kv = kv_bytes_per_token(model, elem) * context
    biggest_ffn = max(
        [cfg.expert_intermediate]
        + [
            m.weight.shape[0]
            for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m.weight.shape[1] == cfg.hidden_size
        ]
    )
    workspace = context * (8 * cfg.hidden_size + 2 * biggest_ffn) * elem + 2 * cfg.vocab_size * 4
    expert = cfg.expert_params * elem
    total = cfg.num_experts * len(cfg.moe_layers)
    fixed = non_expert + kv + workspace
    draft, note = 0, None
    if policy == "moespeq":
        draft = draft_bytes_estimate(cfg, blocksize)
        if budget - fixed - draft < cfg.top_k * expert:
            note = (
                f"the 4-bit draft ({format_size(draft)}) does not fit beside {cfg.top_k} expert slots: "
                "speculation is off (k = 0, gate-prefetch decoding); raise --vram to enable it"
            )
            draft = 0
    fixed += draft
    free = budget - fixed
    need_min = fixed + cfg.top_k * expert
    if free < cfg.top_k * expert:
        raise UsageError(
            f"--vram {format_size(budget)} cannot hold this model's fixed part ({format_size(fixed)}: weights "
            f"{format_size(non_expert)}, KV cache {format_size(kv)} for {context} tokens, workspace {format_size(workspace)}) "
            f"plus {cfg.top_k} expert slots; it needs at least {format_size(need_min)} -- raise --vram or lower the context"
        )
    slots = min(total, free // expert)
    if policy == "resident" and slots < total:
        raise UsageError(
            f"--policy resident needs every expert on the device: {format_size(fixed + total * expert)} in all, "
            f"but --vram is {format_size(budget)}; raise --vram or choose an offloading policy"
        )
    if policy == "ondemand":
        slots = min(slots, cfg.top_k)  # staging buffers only: ondemand keeps nothing
    return Plan(policy, budget, non_expert, kv, workspace, expert, total, int(slots), context, draft, note)
