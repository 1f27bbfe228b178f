"""GLM-4.5 / 4.6 / 4.7 and GLM-4.5-Air (``glm4_moe``): grouped-query attention with biases
on q/k/v, optional per-head q/k RMSNorm (``use_qk_norm``) and *partial* rotary (only the
first ``partial_rotary_factor`` of each head's dimensions rotate, half-split layout; 0.5
when config.json does not say); the first ``first_k_dense_replace`` layers dense; the
others DeepSeek-V3's MoE: sigmoid router with a correction bias and optional group
limit, routed experts, shared experts. The multi-token-prediction layers some
checkpoints carry (``num_nextn_predict_layers``) are beyond ``num_hidden_layers`` and
are not loaded."""

from __future__ import annotations

from torch import nn

from moespeq_cli.models import deepseek_v3
from moespeq_cli.models.base import Attention, Backbone, CausalLM, DecoderLayer, RMSNorm
from moespeq_cli.models.deepseek_v3 import with_defaults
from moespeq_cli.models.mixtral import attention_spec
from moespeq_cli.models.rope import make_rotary, partial_rotary_dim, rope_parameters

# transformers' defaults for what a config.json may leave out
DEFAULTS = {
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
}


def parse(cfg: dict):
    return deepseek_v3.parse(with_defaults(cfg, DEFAULTS))


__all__ = ["Model", "parse"]


class Model(CausalLM):
    def __init__(self, cfg: dict):
        cfg = with_defaults(cfg, DEFAULTS)
        c = self.config = parse(cfg)
        bias = bool(cfg.get("attention_bias", False))
        spec = attention_spec(cfg, qkv_bias=bias, qk_norm="head" if cfg.get("use_qk_norm") else None)
        spec.window = None
        spec.rotary_dim = partial_rotary_dim(cfg, spec.head_dim, 0.5)

        def norm() -> nn.Module:
            return RMSNorm(c.hidden_size, spec.norm_eps)

        layers = [DecoderLayer(Attention(spec), mlp, norm) for mlp in deepseek_v3.mlps(cfg, c)]
        super().__init__(Backbone(c.vocab_size, c.hidden_size, layers, norm()), c.vocab_size, c.hidden_size)
        self.rotary = make_rotary(rope_parameters(cfg), spec.rotary_dim, cfg.get("max_position_embeddings", 4096))
