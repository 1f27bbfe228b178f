"""DeepSeek-V2 / V2-Lite: Multi-head Latent Attention (MLA), shared experts, the first
``first_k_dense_replace`` layers dense, and the greedy or group-limited top-k router
(fp32 softmax, weights times routed_scaling_factor).

MLA compresses keys and values into a ``kv_lora_rank`` latent plus one shared rotary key
of ``qk_rope_head_dim``; ``kv_b_proj`` expands the latent into per-head keys (no
position) and values. Rotary here rotates interleaved pairs (DeepSeek's complex layout).

The KV cache holds the latent, not the expansion: one row of ``kv_lora_rank +
qk_rope_head_dim`` a position and layer, where per-head keys and values would take
``heads * (qk_nope + qk_rope + v_head_dim)`` (18x the bytes on GLM-4.7-Flash, 71x on
DeepSeek-V3). Attention runs *absorbed* over it, as vLLM and SGLang decode: a head's
score ``q_nope . (W_UK c)`` is ``(q_nope W_UK) . c``, so the key expansion ``W_UK`` moves
onto the query (``absorb``), and the weighted sum of values ``W_UV c`` is ``W_UV`` times
the weighted sum of latents, so the value expansion moves after attention (``expand``).
Attention itself is then one shared key and value head (multi-query) of the latent, its
keys the latent and the rotary key, its values the latent (a view of the same row). The
products are the same as the expanded form's, reassociated; rollback is the cache's
truncation, as for every family.

Absorbed, every query pays ``2 * kv_lora_rank + qk_rope_head_dim`` multiply-adds a head
and position where the expanded form pays ``qk_nope + qk_rope + v_head_dim``, in return
for not expanding the cache's positions: a few queries over a long cache (decoding,
verification) absorb, a pass whose queries are most of the context (a prefill) expands
the latents it attends over, as vLLM's prefill does (``absorbs``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moespeq_cli.errors import CheckpointError
from moespeq_cli.models.base import (
    ROLLBACK,
    Backbone,
    CausalLM,
    DecoderLayer,
    GatedMLP,
    KVCache,
    RMSNorm,
    SparseMoE,
    attend,
    attention_scratch,
    causal_mask,
    in_tiles,
    tile_rows,
)
from moespeq_cli.models.config import MoEConfig, moe_config, need
from moespeq_cli.models.rope import (
    apply_rope,
    apply_rope_interleaved,
    make_rotary,
    rope_parameters,
    yarn_mscale,
)


def moe_layer_ids(cfg: dict) -> list[int]:
    layers = need(cfg, "num_hidden_layers", kind=int)
    first_dense = need(cfg, "first_k_dense_replace", default=0, kind=int)
    freq = need(cfg, "moe_layer_freq", default=1, kind=int) or 1
    if not cfg.get("n_routed_experts"):
        return []
    return [i for i in range(layers) if i >= first_dense and i % freq == 0]


def parse(cfg: dict) -> MoEConfig:
    if cfg.get("topk_method") == "noaux_tc":
        raise CheckpointError(
            "config.json names topk_method 'noaux_tc', DeepSeek-V3's router, but model_type 'deepseek_v2'; "
            "fix the file (DeepSeek-V3-style checkpoints say model_type 'deepseek_v3')"
        )
    return moe_config(cfg, ("n_routed_experts",), "moe_intermediate_size", moe_layer_ids(cfg))


def deepseek_router(cfg: dict):
    top_k = need(cfg, "num_experts_per_tok", kind=int)
    method = cfg.get("topk_method") or "greedy"
    n_group, topk_group = cfg.get("n_group"), cfg.get("topk_group")
    scale = float(cfg.get("routed_scaling_factor", 1.0))
    normalize = bool(cfg.get("norm_topk_prob", False)) and top_k > 1

    def route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = logits.softmax(dim=-1, dtype=torch.float32)  # [T, E]
        if method == "group_limited_greedy":
            T, E = scores.shape
            group_best = scores.view(T, n_group, E // n_group).max(dim=-1).values  # [T, G]
            keep = torch.topk(group_best, topk_group, dim=-1).indices
            mask = torch.zeros_like(group_best, dtype=torch.bool).scatter_(1, keep, True)
            scores = scores.masked_fill(~mask.repeat_interleave(E // n_group, dim=1), 0.0)
        w, ids = torch.topk(scores, top_k, dim=-1)
        if normalize:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, w * scale

    return route


class SharedExpertsMoE(SparseMoE):
    def __init__(self, hidden: int, num_experts: int, route, shared_inter: int):
        super().__init__(hidden, num_experts, route, gate_fp32=True)
        self.shared_experts = GatedMLP(hidden, shared_inter)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared_experts(x)


class MLAttention(nn.Module):
    """``interleaved``: rotary on interleaved pairs (DeepSeek's layout); False: half-split
    (DeepSeek-V3 checkpoints with ``rope_interleave: false``)."""

    def __init__(self, cfg: dict, interleaved: bool = True):
        super().__init__()
        self.apply_rope = apply_rope_interleaved if interleaved else apply_rope
        h = need(cfg, "hidden_size", kind=int)
        self.heads = need(cfg, "num_attention_heads", kind=int)
        self.q_lora = cfg.get("q_lora_rank")
        self.kv_lora = need(cfg, "kv_lora_rank", kind=int)
        self.nope = need(cfg, "qk_nope_head_dim", kind=int)
        self.rope_dim = need(cfg, "qk_rope_head_dim", kind=int)
        self.v_dim = need(cfg, "v_head_dim", kind=int)
        bias = bool(cfg.get("attention_bias", False))
        qk = self.nope + self.rope_dim
        if self.q_lora is None:
            self.q_proj = nn.Linear(h, self.heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, self.q_lora, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora, 1e-6)
            self.q_b_proj = nn.Linear(self.q_lora, self.heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora, 1e-6)
        self.kv_b_proj = nn.Linear(self.kv_lora, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, h, bias=bias)
        params = rope_parameters(cfg)
        self.scale = qk**-0.5
        if params["rope_type"] != "default" and params.get("mscale_all_dim"):
            m = yarn_mscale(float(params["factor"]), float(params["mscale_all_dim"]))
            self.scale *= m * m

    def absorbs(self, tokens: int, context: int) -> bool:
        """Whether ``tokens`` queries over ``context`` positions (the new ones included)
        attend absorbed: every pass that continues a cache with at most ``ROLLBACK`` tokens
        (a decoding step, a verification block: they then compute alike, so a block's rows
        equal single steps'), and a longer one where absorbed costs fewer multiply-adds
        than expanding the context's latents."""
        if context > tokens and tokens <= ROLLBACK:
            return True
        r, e = self.kv_lora, self.nope + self.v_dim
        return tokens * context * (2 * r - e) < (context - tokens) * r * e

    def kv_dims(self, tokens: int = 1, context: int = 2**20) -> tuple[int, int, int, int]:
        """(query heads, kv heads, key dim, value dim) of attention as it runs for
        ``tokens`` queries over ``context`` positions (default: decoding): absorbed, one
        latent head (its keys the latent and the rotary key, its values the latent);
        expanded, every head's keys and values."""
        if self.absorbs(tokens, context):
            return self.heads, 1, self.kv_lora + self.rope_dim, self.kv_lora
        return self.heads, self.heads, self.nope + self.rope_dim, self.v_dim

    def expansion_rows(self, tokens: int, context: int) -> int:
        """Rows ``kv_b_proj``'s weight multiplies in a pass: the context's latents where
        the pass expands them; absorbed, the queries' and outputs' products, as many
        multiply-adds as ``tokens`` rows."""
        return tokens if self.absorbs(tokens, context) else context

    def cache_elems(self) -> int:
        """Elements the cache holds a position: one latent row (its values are a view of it)."""
        return self.kv_lora + self.rope_dim

    def expansions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_b_proj``'s weight as the key expansion ``W_UK [H, nope, r]`` and the value
        expansion ``W_UV [H, v, r]`` (views: each head's block of rows)."""
        w = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.kv_lora)
        return w[:, : self.nope], w[:, self.nope :]

    def absorb(self, q_nope: torch.Tensor) -> torch.Tensor:
        """``q_nope [T, H, nope]`` times each head's key expansion: ``[H, T, r]``."""
        w_uk = self.expansions()[0]
        return torch.matmul(q_nope.transpose(0, 1), w_uk.to(q_nope.dtype))

    def expand(self, out: torch.Tensor) -> torch.Tensor:
        """Attention's latent output ``[T, H * r]`` through each head's value expansion:
        ``[T, H * v]``."""
        T, w_uv = out.shape[0], self.expansions()[1]
        y = torch.matmul(out.view(T, self.heads, self.kv_lora).transpose(0, 1), w_uv.to(out.dtype).transpose(1, 2))
        return y.transpose(0, 1).reshape(T, self.heads * self.v_dim)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, rope: tuple) -> torch.Tensor:
        T, H = x.shape[0], self.heads
        q = self.q_proj(x) if self.q_lora is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(T, H, -1).split([self.nope, self.rope_dim], dim=-1)  # [T, H, nope], [T, H, rope]
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora, self.rope_dim], dim=-1)  # [T, r], [T, rope]
        cos, sin = rope
        q_pe = self.apply_rope(q_pe.transpose(0, 1), cos, sin)  # [H, T, rope]
        k_pe = self.apply_rope(k_pe[None], cos, sin)  # [1, T, rope]
        row = torch.cat((self.kv_a_layernorm(latent)[None], k_pe), dim=-1)  # [1, T, r + rope]
        start = cache.length
        k_all, _ = cache.write(layer, row, row[..., :0])  # [1, L, r + rope]
        L = k_all.shape[1]
        if self.absorbs(T, L):
            q = torch.cat((self.absorb(q_nope), q_pe), dim=-1)  # [H, T, r + rope]
            return self.o_proj(self.expand(self.core(q, k_all, k_all[..., : self.kv_lora], start)))
        kv = self.kv_b_proj(k_all[0, :, : self.kv_lora]).view(L, H, -1).transpose(0, 1)  # [H, L, nope + v]
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_all[:, :, self.kv_lora :].expand(H, -1, -1)), dim=-1)
        q = torch.cat((q_nope.transpose(0, 1), q_pe), dim=-1)  # [H, T, nope + rope]
        return self.o_proj(self.core(q, k, v, start))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Attention over the cache: [H, T, dk] queries, [Hkv, L, dk] keys, [Hkv, L, dv]
        values -> [T, H * dv]. Absorbed (one latent head) the heads' queries are the rows
        of one head's: SDPA's grouped-query form would expand the latent to every head
        (its math backend, the one a 576-wide head gets on a GPU: H times the cache)."""
        H, T = q.shape[:2]
        if k.shape[0] != 1 or H == 1:
            return attend(q, k, v, start, self.scale)
        L = k.shape[1]

        def tile(t0: int, n: int) -> torch.Tensor:
            mask = causal_mask(start + t0, n, L, None, q.device)
            out = F.scaled_dot_product_attention(  # 4-D: 3-D inputs rule out a GPU's fused kernels
                q[:, t0 : t0 + n].reshape(1, 1, H * n, -1),
                k[None],
                v[None],
                attn_mask=None if mask is None else mask.repeat(H, 1),
                scale=self.scale,
            )  # [1, 1, H * n, dv]
            return out.view(H, n, -1).transpose(0, 1).reshape(n, -1)

        return in_tiles(T, tile_rows(H, T, L), tile)

    def scratch_bytes(self, context: int, elem: int) -> int:
        """What a pass's attention over ``context`` positions holds besides its output, at
        most (the planner's workspace): expanded (a prefill), every head's keys and values
        of the context beside a tile of ``attend``; absorbed, a tile of scores over the
        latents."""
        expanded = 2 * self.heads * context * (self.nope + self.rope_dim + self.v_dim) * elem
        return expanded + attention_scratch(self.heads, context, elem)


class Model(CausalLM):
    def __init__(self, cfg: dict):
        c = self.config = parse(cfg)
        eps = cfg.get("rms_norm_eps", 1e-6)

        def norm() -> nn.Module:
            return RMSNorm(c.hidden_size, eps)

        route = deepseek_router(cfg)
        shared_inter = c.expert_intermediate * need(cfg, "n_shared_experts", default=0, kind=int)
        layers = []
        for i in range(c.num_layers):
            if i in c.moe_layers:
                if shared_inter:
                    mlp: nn.Module = SharedExpertsMoE(c.hidden_size, c.num_experts, route, shared_inter)
                else:
                    mlp = SparseMoE(c.hidden_size, c.num_experts, route, gate_fp32=True)
            else:
                mlp = GatedMLP(c.hidden_size, need(cfg, "intermediate_size", kind=int), bias=bool(cfg.get("mlp_bias")))
            layers.append(DecoderLayer(MLAttention(cfg), mlp, norm))
        super().__init__(Backbone(c.vocab_size, c.hidden_size, layers, norm()), c.vocab_size, c.hidden_size)
        params = rope_parameters(cfg)
        self.rotary = make_rotary(
            params, need(cfg, "qk_rope_head_dim", kind=int), cfg.get("max_position_embeddings", 4096), interleaved=True
        )

    def rope_tables(self, start: int, end: int, device: torch.device, dtype: torch.dtype) -> tuple:
        return self.rotary.tables(start, end, device, torch.float32)  # the reference rotates in fp32
