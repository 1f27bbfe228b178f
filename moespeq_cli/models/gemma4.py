"""Gemma 4's MoE language model (Gemma-4-26B-A4B): a dense MLP and a routed MoE side by
side in every layer, sliding-window and global attention.

From transformers' implementation (the oracle):

- **the layer**: attention with a norm after it as well as before; then the dense GELU MLP
  on ``pre_feedforward_layernorm(x)`` and the routed experts on
  ``pre_feedforward_layernorm_2(x)``, each output normed (``post_feedforward_layernorm_1``,
  ``_2``), summed, normed again and added; the result scaled by ``layer_scalar``;
- **the router** sees the residual stream itself: a weightless RMSNorm, times a learned
  ``scale`` and ``1/sqrt(hidden)``, a projection, softmax, top-k renormalised, then each
  chosen weight times that expert's ``per_expert_scale``;
- **experts** fused per layer (``experts.gate_up_proj`` ``[E, 2I, H]``, ``down_proj``
  ``[E, H, I]``) with a GELU (tanh) gate: models/expert_format.py;
- **attention**: q/k RMSNorm per head and a weightless v norm, scaling 1 (the norms set
  the scale); sliding layers use ``head_dim`` and standard rotary (theta 10k), global
  layers a larger head (``global_head_dim``), their own KV heads and, with
  ``attention_k_eq_v``, keys that double as values (no ``v_proj``), with "proportional"
  rotary (a quarter of the frequencies, the rest unrotated);
- embeddings scaled by ``sqrt(hidden)``, logits soft-capped (``final_logit_softcapping``).

Gemma 4's small dense models (E2B, E4B) add per-layer input embeddings and share KV caches
between layers; they have no MoE, and configs that ask for either are refused.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moespeq_cli.errors import CheckpointError, UnsupportedModelError
from moespeq_cli.models.base import (
    Attention,
    AttentionSpec,
    Backbone,
    CausalLM,
    GatedMLP,
    KVCache,
    RMSNorm,
    SparseMoE,
    attention_in_parts,
    rows_in_parts,
)
from moespeq_cli.models.config import MoEConfig, moe_config, need
from moespeq_cli.models.expert_format import gemma4_experts
from moespeq_cli.models.rope import make_rotary, rope_parameters

SLIDING, FULL = "sliding_attention", "full_attention"
ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}
DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


def approximate(cfg: dict) -> str:
    act = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ACTIVATIONS:
        raise CheckpointError(
            f"config.json hidden_activation {act!r} is not supported for gemma4 (supported: {', '.join(ACTIVATIONS)})"
        )
    return ACTIVATIONS[act]


def parse(cfg: dict) -> MoEConfig:
    for field, what in (
        ("hidden_size_per_layer_input", "per-layer input embeddings"),
        ("num_kv_shared_layers", "KV caches shared between layers"),
    ):
        if cfg.get(field):
            raise UnsupportedModelError(
                f"this Gemma 4 model uses {what} ({field}), which moespeq does not implement: those are the "
                "small dense Gemma 4 models; moespeq runs the MoE one (Gemma-4-26B-A4B)"
            )
    if cfg.get("use_bidirectional_attention") == "all":
        raise UnsupportedModelError("Gemma 4 with bidirectional attention is an encoder; moespeq runs decoders")
    layers = need(cfg, "num_hidden_layers", kind=int)
    moe = list(range(layers)) if cfg.get("enable_moe_block") else []
    top_k = need(cfg, "top_k_experts", "num_experts_per_tok", default=1, kind=int)
    experts = need(cfg, "num_experts", kind=int) if moe else 0
    if moe and not 1 <= top_k <= experts:
        raise CheckpointError(
            f"config.json: top_k_experts ({top_k}) must be from 1 to the {experts} experts; fix the file"
        )
    cfg = dict(cfg, num_experts_per_tok=top_k)
    return moe_config(cfg, ("num_experts",), "moe_intermediate_size", moe, layout=gemma4_experts(approximate(cfg)))


def layer_types(cfg: dict, layers: int) -> list[str]:
    """Each layer's attention: five sliding to one global by default, the last global."""
    kinds = cfg.get("layer_types")
    if kinds is None:
        kinds = [SLIDING if (i + 1) % 6 else FULL for i in range(layers)]
    if not isinstance(kinds, list) or len(kinds) != layers or any(k not in (SLIDING, FULL) for k in kinds):
        raise CheckpointError(
            f"config.json field 'layer_types' must list {layers} entries, each {SLIDING} or {FULL}; fix the file"
        )
    return kinds[:-1] + [FULL]  # transformers forces the last layer global


def layer_dims(cfg: dict, i: int, kind: str) -> tuple[int, int]:
    """(head_dim, kv heads) of layer ``i``: ``per_layer_config`` where config.json has one,
    else a global layer takes ``global_head_dim`` and, with ``attention_k_eq_v``,
    ``num_global_key_value_heads``."""
    heads = need(cfg, "num_attention_heads", kind=int)
    head_dim = need(cfg, "head_dim", default=256, kind=int)
    kv = need(cfg, "num_key_value_heads", default=heads, kind=int)
    overrides = per_layer_overrides(cfg)
    if overrides is not None:
        o = overrides.get(i, {})
    elif kind == FULL:
        o = {"head_dim": cfg.get("global_head_dim", 512)}
        if cfg.get("attention_k_eq_v", False) and cfg.get("num_global_key_value_heads") is not None:
            o["num_key_value_heads"] = cfg["num_global_key_value_heads"]
    else:
        o = {}
    head_dim, kv = o.get("head_dim", head_dim), o.get("num_key_value_heads", kv)
    for name, v in (("head_dim", head_dim), ("num_key_value_heads", kv)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 8192:
            raise CheckpointError(
                f"config.json: layer {i}'s {name} must be a positive integer, got {v!r}; fix the file"
            )
    if heads % kv or head_dim % 2:
        raise CheckpointError(
            f"config.json: layer {i} has {heads} heads over {kv} KV heads of dimension {head_dim}; "
            "heads must be a multiple of KV heads and the dimension even; fix the file"
        )
    return head_dim, kv


def per_layer_overrides(cfg: dict) -> dict[int, dict] | None:
    """``per_layer_config`` by layer number; transformers writes the keys zero-padded
    ("05" of 30 layers) and reads them with ``int``."""
    raw = cfg.get("per_layer_config")
    if raw is None:
        return None
    bad = CheckpointError(
        "config.json field 'per_layer_config' must map layer numbers to objects of head_dim / "
        "num_key_value_heads; fix the file"
    )
    if not isinstance(raw, dict):
        raise bad
    out = {}
    for key, value in raw.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise bad from None
        if not isinstance(value, dict):
            raise bad
        out[layer] = value
    return out


def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma 4's weightless RMSNorm (the v norm, the router's), in float32."""
    xf = x.float()
    return (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)).type_as(x)


class Gemma4Attention(Attention):
    def __init__(self, spec: AttentionSpec, values: bool, rope_key: tuple[str, int]):
        super().__init__(spec)
        self.scale = 1.0  # the q/k norms set the scale
        self.rope_key = rope_key  # (layer type, head dim): which rotary tables it takes
        if not values:  # keys double as values
            del self.v_proj

    def fuse_qkv(self, product) -> None:
        if hasattr(self, "v_proj"):
            super().fuse_qkv(product)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, rope: dict) -> torch.Tensor:
        s, T = self.s, x.shape[0]
        if hasattr(self, "v_proj"):
            q, k, v = self.project_qkv(x)
            v = v.view(T, s.kv_heads, s.head_dim)
        else:
            q, k = self.q_proj(x), self.k_proj(x)
            v = k.view(T, s.kv_heads, s.head_dim)  # before k's norm and rotation
        q = self.q_norm(q.view(T, s.heads, s.head_dim)).transpose(0, 1)
        k = self.k_norm(k.view(T, s.kv_heads, s.head_dim)).transpose(0, 1)
        v = normalize(v, s.norm_eps).transpose(0, 1)
        cos, sin = rope[self.rope_key]
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        k_all, v_all = cache.write(layer, k, v)
        return self.o_proj(self.core(q, k_all, v_all, cache.length - cache.offset(layer)))


class Gemma4Router(SparseMoE):
    """The layer's ``router`` (``proj``, ``scale``, ``per_expert_scale``) and its routed
    experts, computed on the layer's ``pre_feedforward_layernorm_2`` of the same input."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float, expert_norm: nn.Module):
        super().__init__(hidden, num_experts, self._route)
        self.name_router("proj", nn.Linear(hidden, num_experts, bias=False))
        self.scale = nn.Parameter(torch.ones(hidden))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))
        self.top_k, self.eps, self.root = top_k, eps, hidden**-0.5
        self.__dict__["expert_norm"] = expert_norm  # the layer's (the checkpoint names it there): not a child

    def router_logits(self, x: torch.Tensor, hooked: bool = True) -> torch.Tensor:
        h = normalize(x, self.eps) * self.scale * self.root
        return self.proj(h) if hooked else self.proj.forward(h)

    def _route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return ids, w * self.per_expert_scale[ids]

    def expert_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.expert_norm(x)


class Gemma4Layer(nn.Module):
    def __init__(self, attn: Gemma4Attention, mlp: GatedMLP, c: MoEConfig, eps: float):
        super().__init__()
        h = c.hidden_size
        self.self_attn = attn
        self.mlp = mlp
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "post_feedforward_layernorm_1",
            "post_feedforward_layernorm_2",
            "pre_feedforward_layernorm_2",
        ):
            setattr(self, name, RMSNorm(h, eps))
        self.register_buffer("layer_scalar", torch.ones(1))
        self.router = Gemma4Router(h, c.num_experts, c.top_k, eps, self.pre_feedforward_layernorm_2)

    @property
    def attn(self) -> nn.Module:
        return self.self_attn

    @property
    def ffn(self) -> nn.Module:
        """The runtime's MoE block (the checkpoint names it ``router``)."""
        return self.router

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, rope: dict) -> torch.Tensor:
        x = x + self.post_attention_layernorm(
            attention_in_parts(self.self_attn, self.input_layernorm(x), layer, cache, rope)
        )
        dense = rows_in_parts(
            lambda rows: self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(rows))), x
        )
        routed = self.post_feedforward_layernorm_2(self.ffn(x))
        x = x + self.post_feedforward_layernorm(dense + routed)
        return x * self.layer_scalar


class Model(CausalLM):
    def __init__(self, cfg: dict):
        c = self.config = parse(cfg)
        eps = need(cfg, "rms_norm_eps", default=1e-6)
        heads = need(cfg, "num_attention_heads", kind=int)
        kinds = layer_types(cfg, c.num_layers)
        window = cfg.get("sliding_window") or None
        act = approximate(cfg)
        ropes: set[tuple[str, int]] = set()
        layers = []
        for i, kind in enumerate(kinds):
            head_dim, kv = layer_dims(cfg, i, kind)
            ropes.add((kind, head_dim))
            spec = AttentionSpec(
                hidden=c.hidden_size,
                heads=heads,
                kv_heads=kv,
                head_dim=head_dim,
                qkv_bias=bool(cfg.get("attention_bias")),
                o_bias=bool(cfg.get("attention_bias")),
                qk_norm="head",
                norm_eps=eps,
                window=window if kind == SLIDING else None,
            )
            values = not (kind == FULL and cfg.get("attention_k_eq_v"))
            mlp = GatedMLP(
                c.hidden_size, need(cfg, "intermediate_size", kind=int), act="gelu_tanh" if act == "tanh" else "gelu"
            )
            layers.append(Gemma4Layer(Gemma4Attention(spec, values, (kind, head_dim)), mlp, c, eps))
        norm = RMSNorm(c.hidden_size, eps)
        super().__init__(Backbone(c.vocab_size, c.hidden_size, layers, norm), c.vocab_size, c.hidden_size)
        params = cfg.get("rope_parameters") or {}
        self.rotaries = {}
        for kind, head_dim in sorted(ropes):
            p = params.get(kind) if isinstance(params.get(kind), dict) else DEFAULT_ROPE[kind]
            self.rotaries[(kind, head_dim)] = make_rotary(
                rope_parameters({"rope_parameters": p}), head_dim, c.context_limit
            )
        self.embed_scale = math.sqrt(c.hidden_size)
        self.softcap = cfg.get("final_logit_softcapping")

    ties_by_default = True  # tie_word_embeddings defaults to true in Gemma's configs

    def rope_tables(self, start: int, end: int, device: torch.device, dtype: torch.dtype) -> dict:
        return {key: r.tables(start, end, device, dtype) for key, r in self.rotaries.items()}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().embed(input_ids)
        # the scale in the embedding's dtype, as the reference rounds it (sqrt(3072) is 55.5 in bf16)
        return x * torch.tensor(self.embed_scale, dtype=self.model.embed_tokens.weight.dtype).to(x.dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().logits(x)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
