"""OLMoE (1B-7B): like Mixtral, but q/k RMSNorm over the whole projection (not per head),
optional clipping of q/k/v, and the top-k weights renormalised only if norm_topk_prob."""

from __future__ import annotations

from torch import nn

from moespeq_cli.models.base import Attention, Backbone, CausalLM, DecoderLayer, RMSNorm, SparseMoE, softmax_topk
from moespeq_cli.models.config import MoEConfig, moe_config
from moespeq_cli.models.mixtral import attention_spec, rotary


def parse(cfg: dict) -> MoEConfig:
    return moe_config(cfg, ("num_experts", "num_local_experts"), "intermediate_size")


class Model(CausalLM):
    def __init__(self, cfg: dict):
        c = self.config = parse(cfg)
        bias = bool(cfg.get("attention_bias", False))
        spec = attention_spec(cfg, qk_norm="full", clip_qkv=cfg.get("clip_qkv"), qkv_bias=bias, o_bias=bias)

        def norm() -> nn.Module:
            return RMSNorm(c.hidden_size, spec.norm_eps)

        route = softmax_topk(c.top_k, normalize=bool(cfg.get("norm_topk_prob", False)))
        layers = [
            DecoderLayer(Attention(spec), SparseMoE(c.hidden_size, c.num_experts, route), norm)
            for _ in range(c.num_layers)
        ]
        super().__init__(Backbone(c.vocab_size, c.hidden_size, layers, norm()), c.vocab_size, c.hidden_size)
        self.rotary = rotary(cfg, spec)
