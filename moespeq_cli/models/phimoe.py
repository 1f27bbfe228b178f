"""Phi-3.5-MoE: LayerNorm (with bias) instead of RMSNorm, biases on attention and the LM
head, LongRoPE, and the SparseMixer router: at inference it takes the best expert, then
the best of the rest, each weighted by a softmax over only the logits within a relative
``2 * router_jitter_noise`` of that expert's logit."""

from __future__ import annotations

import torch
from torch import nn

from moespeq_cli.errors import CheckpointError
from moespeq_cli.models.base import Attention, Backbone, CausalLM, DecoderLayer, SparseMoE
from moespeq_cli.models.config import MoEConfig
from moespeq_cli.models.mixtral import attention_spec, rotary
from moespeq_cli.models.mixtral import parse as mixtral_parse


def parse(cfg: dict) -> MoEConfig:
    c = mixtral_parse(cfg)
    if c.top_k != 2:
        raise CheckpointError(f"phimoe's SparseMixer router selects 2 experts; config.json asks for {c.top_k}")
    return c


def sparsemixer(jitter_eps: float):
    def pick(scores: torch.Tensor, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        masked = scores if exclude is None else scores.scatter(-1, exclude, float("-inf"))
        top, ids = masked.max(dim=-1, keepdim=True)  # [T, 1]
        factor = scores.abs().clamp(min=top)
        far = ((top - scores) / factor) > 2 * jitter_eps
        gates = torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1)
        return ids, gates.gather(-1, ids)

    def route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        id1, w1 = pick(logits, None)
        id2, w2 = pick(logits, id1)
        return torch.cat((id1, id2), dim=-1), torch.cat((w1, w2), dim=-1)

    return route


class Model(CausalLM):
    def __init__(self, cfg: dict):
        c = self.config = parse(cfg)
        bias = bool(cfg.get("attention_bias", False))
        spec = attention_spec(cfg, qkv_bias=bias, o_bias=bias)
        eps = cfg.get("rms_norm_eps", 1e-5)

        def norm() -> nn.Module:
            return nn.LayerNorm(c.hidden_size, eps=eps)

        route = sparsemixer(float(cfg.get("router_jitter_noise", 0.01)))
        layers = [
            DecoderLayer(Attention(spec), SparseMoE(c.hidden_size, c.num_experts, route), norm, "block_sparse_moe")
            for _ in range(c.num_layers)
        ]
        super().__init__(
            Backbone(c.vocab_size, c.hidden_size, layers, norm()),
            c.vocab_size,
            c.hidden_size,
            head_bias=bool(cfg.get("lm_head_bias", False)),
        )
        self.rotary = rotary(cfg, spec)
