"""GLM-4.7-Flash (``glm4_moe_lite``): DeepSeek-V3's Multi-head Latent Attention and
GLM-4.5's MoE (the same corrected sigmoid router and shared expert), so it is
deepseek_v3's model; only the default of which layers are dense differs (the first one,
unless ``mlp_layer_types`` or ``first_k_dense_replace`` says otherwise)."""

from __future__ import annotations

from moespeq_cli.models import deepseek_v3
from moespeq_cli.models.config import MoEConfig, moe_config

DEFAULTS = {"norm_topk_prob": True, "routed_scaling_factor": 1.8, "n_group": 1, "topk_group": 1}  # transformers'


def parse(cfg: dict) -> MoEConfig:
    cfg = deepseek_v3.with_defaults(cfg, DEFAULTS)
    layers = deepseek_v3.moe_layer_ids(cfg, default_dense=1)
    return moe_config(cfg, ("n_routed_experts",), "moe_intermediate_size", layers)


class Model(deepseek_v3.Model):
    parse = staticmethod(parse)
    defaults = DEFAULTS
