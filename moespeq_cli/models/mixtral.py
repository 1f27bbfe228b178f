"""Mixtral (8x7B, 8x22B): GQA attention, RMSNorm, softmax top-k router renormalised over
the chosen experts, experts ``w1`` (gate), ``w3`` (up), ``w2`` (down)."""

from __future__ import annotations

from torch import nn

from moespeq_cli.models.base import (
    Attention,
    AttentionSpec,
    Backbone,
    CausalLM,
    DecoderLayer,
    RMSNorm,
    SparseMoE,
    softmax_topk,
)
from moespeq_cli.models.config import MIXTRAL_EXPERTS, MoEConfig, moe_config, need
from moespeq_cli.models.rope import Rotary, make_rotary, rope_parameters


def parse(cfg: dict) -> MoEConfig:
    return moe_config(cfg, ("num_local_experts", "num_experts"), "intermediate_size", layout=MIXTRAL_EXPERTS)


def attention_spec(cfg: dict, **extra) -> AttentionSpec:
    heads = need(cfg, "num_attention_heads", kind=int)
    hidden = need(cfg, "hidden_size", kind=int)
    return AttentionSpec(
        hidden=hidden,
        heads=heads,
        kv_heads=need(cfg, "num_key_value_heads", default=heads, kind=int),
        head_dim=need(cfg, "head_dim", default=hidden // heads, kind=int),
        norm_eps=need(cfg, "rms_norm_eps", default=1e-6),
        window=cfg.get("sliding_window") or None,
        **extra,
    )


def rotary(cfg: dict, spec: AttentionSpec) -> Rotary:
    return make_rotary(rope_parameters(cfg), spec.head_dim, cfg.get("max_position_embeddings", 4096))


class Model(CausalLM):
    def __init__(self, cfg: dict):
        c = self.config = parse(cfg)
        spec = attention_spec(cfg)
        eps = spec.norm_eps

        def norm() -> nn.Module:
            return RMSNorm(c.hidden_size, eps)

        route = softmax_topk(c.top_k, normalize=True, keep_fp32=True)
        layers = [
            DecoderLayer(Attention(spec), SparseMoE(c.hidden_size, c.num_experts, route), norm, "block_sparse_moe")
            for _ in range(c.num_layers)
        ]
        super().__init__(Backbone(c.vocab_size, c.hidden_size, layers, norm()), c.vocab_size, c.hidden_size)
        self.rotary = rotary(cfg, spec)
