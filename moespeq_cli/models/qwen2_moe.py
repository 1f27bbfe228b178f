"""Qwen-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): q/k/v biases, softmax top-k router
(renormalised only if norm_topk_prob), and a shared expert whose output is scaled by a
sigmoid gate. Layers listed in mlp_only_layers, or off the decoder_sparse_step grid, are
dense MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moespeq_cli.errors import CheckpointError
from moespeq_cli.models.base import (
    Attention,
    Backbone,
    CausalLM,
    DecoderLayer,
    GatedMLP,
    RMSNorm,
    SparseMoE,
    softmax_topk,
)
from moespeq_cli.models.config import MoEConfig, moe_config, need
from moespeq_cli.models.mixtral import attention_spec, rotary


def moe_layer_ids(cfg: dict) -> list[int]:
    layers = need(cfg, "num_hidden_layers", kind=int)
    step = need(cfg, "decoder_sparse_step", default=1, kind=int) or 1
    dense = set(cfg.get("mlp_only_layers") or [])
    return [i for i in range(layers) if i not in dense and (i + 1) % step == 0]


def parse(cfg: dict) -> MoEConfig:
    return moe_config(cfg, ("num_experts", "num_local_experts"), "moe_intermediate_size", moe_layer_ids(cfg))


class SharedExpertMoE(SparseMoE):
    def __init__(self, hidden: int, num_experts: int, route, shared_inter: int):
        super().__init__(hidden, num_experts, route)
        self.shared_expert = GatedMLP(hidden, shared_inter)
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class Model(CausalLM):
    def __init__(self, cfg: dict):
        c = self.config = parse(cfg)
        spec = attention_spec(cfg, qkv_bias=bool(cfg.get("qkv_bias", True)))
        if cfg.get("use_sliding_window"):
            raise CheckpointError("config.json sets use_sliding_window, which moespeq does not implement for qwen2_moe")
        spec.window = None  # the window applies only with use_sliding_window

        def norm() -> nn.Module:
            return RMSNorm(c.hidden_size, spec.norm_eps)

        route = softmax_topk(c.top_k, normalize=bool(cfg.get("norm_topk_prob", False)))
        shared_inter = need(cfg, "shared_expert_intermediate_size", kind=int)
        layers = []
        for i in range(c.num_layers):
            if i in c.moe_layers:
                mlp: nn.Module = SharedExpertMoE(c.hidden_size, c.num_experts, route, shared_inter)
            else:
                mlp = GatedMLP(c.hidden_size, need(cfg, "intermediate_size", kind=int))
            layers.append(DecoderLayer(Attention(spec), mlp, norm))
        super().__init__(Backbone(c.vocab_size, c.hidden_size, layers, norm()), c.vocab_size, c.hidden_size)
        self.rotary = rotary(cfg, spec)
