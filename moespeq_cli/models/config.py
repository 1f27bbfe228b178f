"""MoEConfig: what the runtime needs to know about any supported checkpoint, read from
config.json. Family files fill it; the planner, expert store and cache only read it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moespeq_cli.errors import CheckpointError
from moespeq_cli.models.expert_format import HF_EXPERTS, MIXTRAL_EXPERTS, ExpertFormat  # noqa: F401 (re-exported)

DEFAULT_CONTEXT = 4096  # what the rotary code assumes when config.json names no limit

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@dataclass
class MoEConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    moe_layers: list[int]
    num_experts: int
    top_k: int
    expert_intermediate: int
    dtype: torch.dtype
    expert_format: ExpertFormat  # the experts' tensors in the checkpoint, and their compute
    context_limit: int = DEFAULT_CONTEXT  # max_position_embeddings: the longest sequence the model takes
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def expert_prefix(self) -> str:
        return self.expert_format.prefix

    def expert_keys(self, layer: int, expert: int) -> tuple[str, ...]:
        """The tensors holding the expert's parts (a fused format: the layer's shared ones)."""
        return self.expert_format.keys(layer, expert)

    def expert_shapes(self) -> tuple[tuple[int, ...], ...]:
        """One expert's parts as stored (expert_format.py)."""
        return self.expert_format.shapes(self.hidden_size, self.expert_intermediate)

    @property
    def expert_params(self) -> int:
        """Weights of one expert: its three matrices and any biases."""
        h, i = self.hidden_size, self.expert_intermediate
        return 3 * h * i + self.expert_format.bias_numel(h, i)

    def expert_bytes(self, elem: int) -> int:
        """One expert's bytes in a tier that holds weights in ``elem``-byte elements; a
        compact format (MXFP4) is held as stored, whatever the tier's dtype."""
        fmt = self.expert_format
        if fmt.compact:
            return fmt.nbytes(self.hidden_size, self.expert_intermediate, self.dtype)
        return self.expert_params * elem

    @property
    def stored_expert_bytes(self) -> int:
        """One expert as every memory tier holds it and every copy moves it: as the
        checkpoint stores it, whatever ``--dtype`` the model computes in (the disk tier
        reads it in place; runtime/tiers/disk.py)."""
        return self.expert_bytes(self.dtype.itemsize)


def need(cfg: dict, *names: str, default=None, kind=None):
    """The first of ``names`` present in config.json; a clear error when required and absent."""
    for n in names:
        if cfg.get(n) is not None:
            v = cfg[n]
            if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise CheckpointError(f"config.json field {n!r} must be a non-negative integer, got {v!r}")
            return v
    if default is None:
        raise CheckpointError(
            f"config.json lacks {names[0]!r}; the checkpoint is incomplete or not a {cfg.get('model_type')} model"
        )
    return default


def checkpoint_dtype(cfg: dict) -> torch.dtype:
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if name not in DTYPES:
        raise CheckpointError(f"config.json dtype {name!r} is not supported (use float32, float16 or bfloat16)")
    return DTYPES[name]


def check_activation(cfg: dict) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config.json hidden_act {act!r} is not supported; moespeq implements 'silu' experts")


def moe_config(
    cfg: dict,
    experts_key: tuple[str, ...],
    inter_key: str,
    moe_layers: list[int] | None = None,
    layout: ExpertFormat = HF_EXPERTS,
) -> MoEConfig:
    """The MoEConfig every family shares; ``experts_key`` lists config.json's names for the
    routed-expert count, ``inter_key`` the expert's intermediate size; ``moe_layers`` None
    means every layer is sparse; ``layout`` how the checkpoint stores the experts."""
    check_activation(cfg)
    layers = need(cfg, "num_hidden_layers", kind=int)
    return MoEConfig(
        model_type=cfg["model_type"],
        vocab_size=need(cfg, "vocab_size", kind=int),
        hidden_size=need(cfg, "hidden_size", kind=int),
        num_layers=layers,
        moe_layers=list(range(layers)) if moe_layers is None else moe_layers,
        num_experts=need(cfg, *experts_key, kind=int),
        top_k=need(cfg, "num_experts_per_tok", kind=int),
        expert_intermediate=need(cfg, inter_key, kind=int),
        dtype=checkpoint_dtype(cfg),
        expert_format=layout,
        context_limit=need(cfg, "max_position_embeddings", default=DEFAULT_CONTEXT, kind=int),
        raw=cfg,
    )
