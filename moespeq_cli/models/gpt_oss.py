"""gpt-oss (gpt-oss-20b, gpt-oss-120b): OpenAI's open-weight MoE.

What sets it apart from the Mixtral pattern, each from transformers' implementation:

- **attention sinks**: each head has a learned logit that joins every query's softmax as
  one more "key" with no value -- it soaks up attention mass, so a head can attend to
  nothing. The probabilities are ``softmax([scores, sink])`` with the sink's share dropped
  (``SinkAttention.core``);
- **alternating attention**: ``layer_types`` makes every other layer sliding-window
  (``sliding_window`` keys, 128 in the releases), the rest full; q/k/v/o with biases;
  YaRN rotary (half-split) with ``truncate: false``;
- **a biased router** whose top-k *logits* are softmaxed (not top-k of a softmax);
- **fused, biased experts** with a clamped SwiGLU (models/expert_format.py: ``gate_up_proj``
  ``[E, H, 2I]`` with gate and up interleaved, ``down_proj`` ``[E, I, H]``).

The published checkpoints store the experts in MXFP4 (``quantization_config`` with
``quant_method: mxfp4``: ``_blocks`` of 4-bit codes and ``_scales``, the rest bf16): moespeq
keeps them so in every tier and dequantizes each expert when it computes
(models/expert_format.py); bf16 releases and conversions run too.
"""

from __future__ import annotations

import torch
from torch import nn

from moespeq_cli.errors import CheckpointError
from moespeq_cli.models.base import (
    Attention,
    Backbone,
    CausalLM,
    DecoderLayer,
    RMSNorm,
    SparseMoE,
    causal_mask,
    in_tiles,
    in_window,
    tile_rows,
)
from moespeq_cli.models.config import MoEConfig, moe_config, need
from moespeq_cli.models.deepseek_v3 import with_defaults
from moespeq_cli.models.expert_format import MXFP4, gpt_oss_experts
from moespeq_cli.models.mixtral import attention_spec
from moespeq_cli.models.rope import make_rotary, rope_parameters

# transformers' defaults for what a config.json may leave out (the releases state them)
DEFAULTS = {
    "head_dim": 64,
    "sliding_window": 128,
    "attention_bias": True,
    "swiglu_alpha": 1.702,
    "swiglu_limit": 7.0,
    "rope_theta": 150000.0,
}
DEFAULT_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}
LAYER_TYPES = ("sliding_attention", "full_attention")


def _cfg(cfg: dict) -> dict:
    cfg = with_defaults(cfg, DEFAULTS)
    if not cfg.get("rope_parameters") and not cfg.get("rope_scaling"):
        cfg["rope_parameters"] = dict(DEFAULT_ROPE, rope_theta=cfg["rope_theta"])
    return cfg


QUANT_METHODS = (MXFP4,)  # the published checkpoints' experts, read as they are stored


def parse(cfg: dict) -> MoEConfig:
    cfg = _cfg(cfg)
    quant = cfg.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    fmt = gpt_oss_experts(float(need(cfg, "swiglu_alpha")), float(need(cfg, "swiglu_limit")), method)
    h, i = need(cfg, "hidden_size", kind=int), need(cfg, "intermediate_size", kind=int)
    if method == MXFP4 and (h % 32 or i % 32):
        raise CheckpointError(
            f"config.json: MXFP4 experts need hidden_size and intermediate_size multiples of 32 (got {h}, {i}); "
            "fix the file"
        )
    return moe_config(cfg, ("num_local_experts", "num_experts"), "intermediate_size", layout=fmt)


def layer_types(cfg: dict, layers: int) -> list[str]:
    """Each layer's attention; transformers' default alternates, sliding first."""
    kinds = cfg.get("layer_types")
    if kinds is None:
        return [LAYER_TYPES[i % 2] for i in range(layers)]
    if not isinstance(kinds, list) or len(kinds) != layers or any(k not in LAYER_TYPES for k in kinds):
        raise CheckpointError(
            f"config.json field 'layer_types' must list {layers} entries, each one of {', '.join(LAYER_TYPES)}; "
            "fix the file"
        )
    return kinds


class SinkAttention(Attention):
    """Grouped-query attention whose softmax has one more, learned logit per head."""

    def __init__(self, spec):
        super().__init__(spec)
        self.sinks = nn.Parameter(torch.empty(spec.heads))

    def scratch_bytes(self, context: int, elem: int) -> int:
        """A tile's scores, masked scores, logits and probabilities, their temporaries and
        its mask (``core``; measured: tests/test_attend.py)."""
        return self.s.heads * tile_rows(self.s.heads, context, context) * context * (7 * elem + 1)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Each group's query heads as the rows of one (no copy of the cache per head), in
        tiles of query rows (``tile_rows``): a prompt's scores are ``[H, T, L]``, 34 GiB
        for gpt-oss-20b at 16K tokens in one piece."""
        heads, T, d = q.shape
        k, v, start = in_window(k, v, start, T, self.s.window)
        groups, L = k.shape[0], k.shape[1]
        rep = heads // groups

        def tile(t0: int, n: int) -> torch.Tensor:
            qg = q[:, t0 : t0 + n].reshape(groups, rep * n, d)  # rows (head in group, query)
            scores = torch.matmul(qg, k.transpose(1, 2)) * self.scale  # [groups, rep * n, L]
            mask = causal_mask(start + t0, n, L, self.s.window, q.device)
            if mask is not None:
                scores = scores.masked_fill(~mask.repeat(rep, 1), float("-inf"))
            sink = self.sinks.to(scores.dtype).view(groups, rep, 1, 1).expand(groups, rep, n, 1)
            logits = torch.cat([scores, sink.reshape(groups, rep * n, 1)], dim=-1)
            logits = logits - logits.max(dim=-1, keepdim=True).values
            probs = torch.softmax(logits, dim=-1)[..., :-1]  # the sink's share is dropped
            o = torch.matmul(probs.to(v.dtype), v)  # [groups, rep * n, dv]
            return o.view(heads, n, -1).transpose(0, 1).reshape(n, -1)

        return in_tiles(T, tile_rows(heads, T, L), tile)


def topk_softmax(top_k: int):
    """The top k router logits, softmaxed among themselves."""

    def route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, ids = torch.topk(logits, top_k, dim=-1)
        return ids, torch.softmax(top, dim=-1, dtype=top.dtype)

    return route


class RouterMoE(SparseMoE):
    """SparseMoE whose router is the checkpoint's ``mlp.router`` (with a bias)."""

    def __init__(self, hidden: int, num_experts: int, route):
        super().__init__(hidden, num_experts, route)
        self.name_router("router", nn.Linear(hidden, num_experts, bias=True))


class Model(CausalLM):
    def __init__(self, cfg: dict):
        cfg = _cfg(cfg)
        c = self.config = parse(cfg)
        bias = bool(cfg.get("attention_bias"))
        kinds = layer_types(cfg, c.num_layers)
        window = cfg.get("sliding_window") or None

        def norm() -> nn.Module:
            return RMSNorm(c.hidden_size, need(cfg, "rms_norm_eps", default=1e-5))

        route = topk_softmax(c.top_k)
        layers = []
        for kind in kinds:
            spec = attention_spec(cfg, qkv_bias=bias, o_bias=bias)
            spec.window = window if kind == "sliding_attention" else None
            layers.append(DecoderLayer(SinkAttention(spec), RouterMoE(c.hidden_size, c.num_experts, route), norm))
        super().__init__(Backbone(c.vocab_size, c.hidden_size, layers, norm()), c.vocab_size, c.hidden_size)
        head_dim = layers[0].self_attn.s.head_dim
        self.rotary = make_rotary(rope_parameters(cfg, 150000.0), head_dim, c.context_limit)
