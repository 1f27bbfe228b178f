"""DeepSeek-V3 / R1, Kimi-K2, Moonlight: DeepSeek-V2's Multi-head Latent Attention, shared
experts and first dense layers, with V3's router.

The router (``sigmoid_group_router``, shared with GLM-4.5 and its kin):

1. scores are the sigmoid of the fp32 router logits, one per expert, independent of each
   other (not a softmax);
2. a learned per-expert ``e_score_correction_bias`` is added *only to choose* experts
   (it balances load during training); the weights come from the uncorrected scores;
3. group-limited choice: experts are split into ``n_group`` groups, each group is rated
   by the sum of its two best corrected scores, and only the ``topk_group`` best groups
   may supply the ``top_k`` experts;
4. the chosen scores are renormalised to sum to one when ``norm_topk_prob``, then
   multiplied by ``routed_scaling_factor``.

Rotary rotates interleaved pairs, as in V2, unless config.json says
``rope_interleave: false`` (then the half-split layout of Llama).
"""

from __future__ import annotations

import torch
from torch import nn

from moespeq_cli.errors import CheckpointError
from moespeq_cli.models.base import (
    Backbone,
    CausalLM,
    DecoderLayer,
    Fp32Router,
    GatedMLP,
    RMSNorm,
    SparseMoE,
    rounded_once,
)
from moespeq_cli.models.config import MoEConfig, moe_config, need
from moespeq_cli.models.deepseek_v2 import MLAttention
from moespeq_cli.models.rope import make_rotary, rope_parameters

# transformers' defaults for what a config.json may leave out (published checkpoints
# state them); each family module that reuses this one names its own
DEFAULTS = {
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "n_group": 8,
    "topk_group": 4,
    "first_k_dense_replace": 3,
}


def with_defaults(cfg: dict, defaults: dict) -> dict:
    return {**defaults, **{k: v for k, v in cfg.items() if v is not None}}


def moe_layer_ids(cfg: dict, default_dense: int = 0) -> list[int]:
    """The sparse layers: ``mlp_layer_types`` ("dense"/"sparse" per layer, GLM-4.7-Flash's
    transformers config) when given, else every layer from ``first_k_dense_replace`` on."""
    layers = need(cfg, "num_hidden_layers", kind=int)
    kinds = cfg.get("mlp_layer_types")
    if isinstance(kinds, list) and len(kinds) == layers:
        return [i for i, k in enumerate(kinds) if k == "sparse"]
    first_dense = need(cfg, "first_k_dense_replace", default=default_dense, kind=int)
    return list(range(first_dense, layers))


def parse(cfg: dict) -> MoEConfig:
    cfg = with_defaults(cfg, DEFAULTS)
    return moe_config(cfg, ("n_routed_experts",), "moe_intermediate_size", moe_layer_ids(cfg))


class CorrectedGate(Fp32Router):
    """The router's weight plus ``e_score_correction_bias`` (the checkpoint's name), a
    per-expert bias that steers the choice of experts but not their weights."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__(hidden, num_experts, bias=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)


def sigmoid_group_router(cfg: dict, gate: CorrectedGate):
    """V3's routing rule (the module docstring) for the layer whose router is ``gate``."""
    top_k = need(cfg, "num_experts_per_tok", kind=int)
    groups = need(cfg, "n_group", default=1, kind=int) or 1
    keep = need(cfg, "topk_group", default=groups, kind=int) or groups
    scale = float(cfg.get("routed_scaling_factor", 1.0))
    normalize = bool(cfg.get("norm_topk_prob", False))
    experts = gate.out_features
    if groups > 1 and (experts % groups or keep > groups or top_k > keep * (experts // groups)):
        raise CheckpointError(  # the values after the family's defaults (V3: 8 groups, 4 kept)
            f"config.json: group-limited routing needs n_group dividing the {experts} experts, topk_group <= "
            f"n_group and num_experts_per_tok ({top_k}) within the kept groups' experts (n_group {groups}, "
            f"topk_group {keep}, with transformers' defaults where absent); fix the file"
        )

    def route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = rounded_once(torch.sigmoid, logits.float())  # [T, E]
        choice = scores + gate.e_score_correction_bias.float()
        if groups > 1 and keep < groups:
            T, E = choice.shape
            grouped = choice.view(T, groups, E // groups)
            rating = grouped.topk(min(2, E // groups), dim=-1).values.sum(dim=-1)  # [T, G]
            best = rating.topk(keep, dim=-1).indices
            allowed = torch.zeros_like(rating, dtype=torch.bool).scatter_(1, best, True)
            choice = choice.masked_fill(~allowed.repeat_interleave(E // groups, dim=1), float("-inf"))
        ids = choice.topk(top_k, dim=-1).indices
        w = scores.gather(1, ids)
        if normalize:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, w * scale

    return route


class SigmoidMoE(SparseMoE):
    """Routed experts behind a corrected sigmoid router, and the shared experts if any
    (``shared_experts``, a plain gated MLP of ``shared_inter``)."""

    def __init__(self, cfg: dict, hidden: int, num_experts: int, shared_inter: int):
        super().__init__(hidden, num_experts, route=None, gate_fp32=True)
        self.gate = CorrectedGate(hidden, num_experts)
        self.route = sigmoid_group_router(cfg, self.gate)
        if shared_inter:
            self.shared_experts = GatedMLP(hidden, shared_inter)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        mlp = getattr(self, "shared_experts", None)
        return None if mlp is None else mlp(x)


def mlps(cfg: dict, c: MoEConfig) -> list[nn.Module]:
    """Each layer's MLP: the sigmoid-routed MoE with its shared experts on the sparse
    layers, a dense gated MLP on the others (DeepSeek-V3 and GLM-4.5 alike)."""
    shared_inter = c.expert_intermediate * need(cfg, "n_shared_experts", default=0, kind=int)
    return [
        SigmoidMoE(cfg, c.hidden_size, c.num_experts, shared_inter)
        if i in c.moe_layers
        else GatedMLP(c.hidden_size, need(cfg, "intermediate_size", kind=int))
        for i in range(c.num_layers)
    ]


class Model(CausalLM):
    parse = staticmethod(parse)  # GLM-4.7-Flash's model is this one with its own parse
    defaults = DEFAULTS

    def __init__(self, cfg: dict):
        cfg = with_defaults(cfg, self.defaults)
        c = self.config = self.parse(cfg)
        eps = cfg.get("rms_norm_eps", 1e-6)

        def norm() -> nn.Module:
            return RMSNorm(c.hidden_size, eps)

        interleaved = bool(cfg.get("rope_interleave", True))
        layers = [DecoderLayer(MLAttention(cfg, interleaved=interleaved), mlp, norm) for mlp in mlps(cfg, c)]
        super().__init__(Backbone(c.vocab_size, c.hidden_size, layers, norm()), c.vocab_size, c.hidden_size)
        self.rotary = make_rotary(
            rope_parameters(cfg),
            need(cfg, "qk_rope_head_dim", kind=int),
            cfg.get("max_position_embeddings", 4096),
            interleaved=interleaved,
        )

    def rope_tables(self, start: int, end: int, device: torch.device, dtype: torch.dtype) -> tuple:
        # interleaved pairs rotate in fp32 (apply_rope_interleaved); the half-split layout
        # in the activations' dtype, as transformers does (fp32 tables made q_pe and k_pe
        # fp32 under bf16: the latent cache's row fp32, attention refusing mixed dtypes)
        return self.rotary.tables(start, end, device, torch.float32 if self.rotary.interleaved else dtype)
