"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): per-head q/k RMSNorm before rotary, an explicit
head_dim, no biases, no shared expert; top-k weights renormalised when norm_topk_prob."""

from __future__ import annotations

from torch import nn

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
from moespeq_cli.models.config import need
from moespeq_cli.models.mixtral import attention_spec, rotary
from moespeq_cli.models.qwen2_moe import parse


class Model(CausalLM):
    def __init__(self, cfg: dict):
        c = self.config = parse(cfg)
        bias = bool(cfg.get("attention_bias", False))
        spec = attention_spec(cfg, qk_norm="head", qkv_bias=bias, o_bias=bias)
        spec.window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None

        def norm() -> nn.Module:
            return RMSNorm(c.hidden_size, spec.norm_eps)

        route = softmax_topk(c.top_k, normalize=bool(cfg.get("norm_topk_prob", False)))
        layers = []
        for i in range(c.num_layers):
            if i in c.moe_layers:
                mlp: nn.Module = SparseMoE(c.hidden_size, c.num_experts, route)
            else:
                mlp = GatedMLP(c.hidden_size, need(cfg, "intermediate_size", kind=int))
            layers.append(DecoderLayer(Attention(spec), mlp, norm))
        super().__init__(Backbone(c.vocab_size, c.hidden_size, layers, norm()), c.vocab_size, c.hidden_size)
        self.rotary = rotary(cfg, spec)
