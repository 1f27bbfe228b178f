"""The VRAM planner: what lives on the device, and how many expert slots are left.

Budget = non-expert weights (attention, norms, routers, shared experts, dense layers,
embeddings, LM head; full precision) + the KV cache for the requested context +
activation workspace + N full-precision expert slots. The planner works from the model's
shapes alone (a model on the meta device), so an impossible budget is refused before any
weight is read, with what it needs and what to change.

moespeq's 4-bit draft: when all of it fits beside ``top_k`` expert slots it all goes on the
device. When it does not, and experts may run on the CPU (the default), half of the room
above ``top_k`` slots goes to draft experts (the same number per layer) and the rest to
slots; the draft computes its other experts on the CPU from 4-bit host copies. With
``--no-cpu-experts`` a draft that does not fit is dropped (k = 0, gate-prefetch decoding).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moespeq_cli.errors import UsageError
from moespeq_cli.models import build_model
from moespeq_cli.models.base import CausalLM
from moespeq_cli.models.config import MoEConfig
from moespeq_cli.runtime.planning.costs import elem_size
from moespeq_cli.runtime.planning.hardware import format_size


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
    draft_bytes: int = 0  # the 4-bit draft's routed experts on the device (moespeq)
    draft_device_experts: int = 0  # how many of the draft's experts are on the device
    cpu_experts: bool = False  # experts not on the device may be computed on the CPU
    has_draft: bool = False  # moespeq runs its 4-bit draft (on the device, the CPU, or both)
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
            *(
                [(f"4-bit draft experts ({self.draft_device_experts} of {self.total_experts})", self.draft_bytes)]
                if self.draft_bytes
                else []
            ),
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


def checkpoint_plan(ckpt, context: int, budget: int = 10**15, policy: str = "lru", dtype=None, **kw) -> Plan:
    """``make_plan`` for a Checkpoint, its model built on the meta device (no weights read).
    The default budget is unbounded: the plan then gives the fixed part and expert sizes."""
    with torch.device("meta"):
        model = build_model(ckpt.arch, ckpt.raw_config, context, str(ckpt.path / "config.json"))
    return make_plan(model, ckpt.config, dtype or ckpt.config.dtype, budget, context, policy, **kw)


def spread(count: int, layers: list[int], num_experts: int) -> list[tuple[int, int]]:
    """``count`` (layer, expert) keys, the same number per layer (later layers take the
    remainder), lowest expert ids first: a placement that assumes no routing statistics."""
    per_layer = [min(num_experts, (count + i) // len(layers)) for i in range(len(layers))]
    return [(layer, e) for layer, n in zip(layers, per_layer, strict=True) for e in range(n)]


def make_plan(
    model: CausalLM,
    cfg: MoEConfig,
    dtype: torch.dtype,
    budget: int,
    context: int,
    policy: str,
    blocksize: int = 64,
    cpu_experts: bool = False,
    with_draft: bool = True,
    max_slots: int | None = None,
) -> Plan:
    """``model`` may live on the meta device: only shapes are read. For moespeq the 4-bit
    draft is placed too unless ``with_draft`` is False (module docstring); ``note`` says
    what the planner decided. ``max_slots`` caps the expert slots (bench's same-cache
    budget)."""
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
    total_draft = draft_device = 0
    if policy == "moespeq" and with_draft:
        total_draft = draft = draft_bytes_estimate(cfg, blocksize)
        draft_device = total
        room = budget - fixed - cfg.top_k * expert  # above the minimum slots
        if room < draft and cpu_experts:
            per_draft_expert = draft / total
            draft_device = int(max(0, room // 2) // per_draft_expert)
            draft = int(draft_device * per_draft_expert)
            note = (
                f"the 4-bit draft ({format_size(total_draft)}) does not fit beside {cfg.top_k} expert slots: "
                f"{draft_device} of its {total} experts are on the device, the rest run on the CPU"
            )
        elif room < draft:
            note = (
                f"the 4-bit draft ({format_size(draft)}) does not fit beside {cfg.top_k} expert slots: "
                "speculation is off (k = 0, gate-prefetch decoding); raise --vram to enable it"
            )
            draft = draft_device = 0
    fixed += draft
    free = budget - fixed
    need_min = fixed + cfg.top_k * expert
    if free < cfg.top_k * expert:
        raise UsageError(
            f"--vram {format_size(budget)} cannot hold this model's fixed part ({format_size(fixed)}: weights "
            f"{format_size(non_expert)}, KV cache {format_size(kv)} for {context} tokens, workspace {format_size(workspace)}) "
            f"plus {cfg.top_k} expert slots; it needs at least {format_size(need_min)} -- raise --vram or lower the context"
        )
    slots = min(total, free // expert, max_slots if max_slots is not None else total)
    if policy == "resident" and slots < total:
        raise UsageError(
            f"--policy resident needs every expert on the device: {format_size(fixed + total * expert)} in all, "
            f"but --vram is {format_size(budget)}; raise --vram or choose an offloading policy"
        )
    if policy == "ondemand":
        slots = min(slots, cfg.top_k)  # staging buffers only: ondemand keeps nothing
    return Plan(
        policy,
        budget,
        non_expert,
        kv,
        workspace,
        expert,
        total,
        int(slots),
        context,
        draft,
        draft_device,
        cpu_experts,
        policy == "moespeq" and with_draft and (draft > 0 or cpu_experts),
        note,
    )
