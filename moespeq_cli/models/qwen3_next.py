"""Qwen3-Next (``qwen3_next``, Qwen3-Next-80B-A3B): a hybrid of linear and full attention.

Most layers (``layer_types``: three in four by default) mix tokens with a **Gated
DeltaNet**, a linear attention that keeps a fixed-size recurrent state per head instead
of a KV cache:

- one projection gives q, k, v and an output gate z per key-head group, another the
  per-value-head ``b`` (write strength, beta = sigmoid(b)) and ``a`` (decay: g =
  -exp(A_log) * softplus(a + dt_bias));
- q, k and v pass a short causal depthwise convolution (``linear_conv_kernel_dim``
  taps, SiLU), whose last inputs are part of the state;
- per token, with q and k L2-normalised and q scaled by 1/sqrt(d_k), the state S
  [d_k, d_v] of each value head decays by exp(g), then takes the delta rule's write
  S += k (beta (v - S^T k))^T, and the output is S^T q;
- the output is RMS-normalised per head and gated by SiLU(z) (``norm``), then projected.

The other layers are **gated full attention**: q_proj gives each head's query and an
output gate side by side, q and k get per-head RMSNorm, only the first
``partial_rotary_factor`` (0.25) of each head rotates, and the attention output is
multiplied by sigmoid(gate). Every RMSNorm but the gated one scales by (1 + weight). The
MoE is Qwen2-MoE's: softmax top-k, a shared expert behind a sigmoid gate.

Speculative decoding stays exact: a pass stores the recurrent state after each of its
tokens (``KVCache.save_states``), so rejected draft tokens roll back like a KV cache.
Such a pass (a decoded token, a draft's step, a verification) runs the recurrence token
by token (``delta_steps``), with its exp, sigmoid, SiLU and softplus each computed in
float64 and rounded to float32 (``rounded_once``: per element, whatever the pass), so
that a verification block's values equal single steps' bit for bit. A prompt keeps only
its last state, and takes the **chunked form** (``delta_chunks``): the same recurrence
solved ``CHUNK`` tokens at a time with matrix products (the delta rule's writes within a
chunk are a unit lower-triangular system); at Qwen3-Next's shapes (2,048 tokens, 32
heads of 128x128) the recurrence takes 0.12 s a layer on two cores against the steps'
6.1 s, and the whole layer with its bf16 projections 1.4 s against 6.8 s; ~10 ops a chunk where the steps launch 5 a token. A step
reads and writes the state with batched matrix-vector products (``torch.bmm``, an
in-place ``baddbmm_`` for the write): 0.38 ms a layer at those shapes on one core, where
broadcast products and sums took 0.92 ms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moespeq_cli.errors import CheckpointError
from moespeq_cli.models.base import (
    Attention,
    Backbone,
    CausalLM,
    DecoderLayer,
    GatedMLP,
    KVCache,
    rounded_once,
    softmax_topk,
)
from moespeq_cli.models.config import need
from moespeq_cli.models.mixtral import attention_spec
from moespeq_cli.models.qwen2_moe import SharedExpertMoE, parse
from moespeq_cli.models.rope import make_rotary, partial_rotary_dim, rope_parameters

__all__ = ["GatedDeltaNet", "Model", "delta_chunks", "delta_steps", "parse"]

CHUNK = 64  # tokens a chunk of the chunked form solves at once (the reference's size)


def delta_steps(q, k, v, beta, decay, S, keep) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The gated delta rule token by token. q, k [T, nv, dk] (normalised, q scaled), v
    [T, nv, dv], beta and decay [T, nv], S [nv, dk, dv] float32 -> (outputs [T, nv, dv],
    the states after the tokens t that ``keep(t)`` asks for)."""
    out, states = [], {}
    for t in range(q.shape[0]):
        kt = k[t][:, None, :]  # [nv, 1, dk]
        S = S * decay[t][:, None, None]  # a new state: a kept one is never written again
        remembered = torch.bmm(kt, S)  # [nv, 1, dv]
        S.baddbmm_(kt.transpose(1, 2), (v[t][:, None, :] - remembered) * beta[t][:, None, None])
        out.append(torch.bmm(q[t][:, None, :], S)[:, 0])
        if keep(t):
            states[t] = S
    return torch.stack(out), states


def delta_chunks(q, k, v, beta, log_decay, S) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence ``CHUNK`` tokens at a time -> (outputs, the last state).

    Within a chunk starting from state S0, with G_t the cumulative log-decay, the state
    after token t is ``exp(G_t) S0 + sum_{i<=t} exp(G_t - G_i) k_i w_i^T``, where the
    write w_t = beta_t (v_t - exp(G_t) S0^T k_t - sum_{i<t} exp(G_t - G_i) (k_t.k_i) w_i)
    depends on the earlier writes: (I + A) W = diag(beta) (V - diag(exp G) K S0), A
    strictly lower triangular, one triangular solve for the chunk. Then the outputs
    ``exp(G_t) q_t S0 + sum_{i<=t} exp(G_t - G_i) (q_t.k_i) w_i`` and the next S0 are
    matrix products. Only differences G_t - G_i (t >= i) are exponentiated, so a strong
    decay underflows to zero and never overflows; G is summed in float64 (no cancellation
    where it grows large) from log-decays held above -1e4 (exp of either is 0 in float32;
    an infinite one made -inf - -inf, NaN, where the steps give 0)."""
    out = []
    for s in range(0, q.shape[0], CHUNK):
        qc, kc, vc = (x[s : s + CHUNK].transpose(0, 1) for x in (q, k, v))  # [nv, c, d]
        bc = beta[s : s + CHUNK].t()[..., None]  # [nv, c, 1]
        G = log_decay[s : s + CHUNK].t().double().clamp(min=-1e4).cumsum(-1)  # [nv, c]
        c = qc.shape[1]
        seen = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()  # i <= t
        decays = (G[:, :, None] - G[:, None, :]).masked_fill(~seen, float("-inf")).exp().float()  # [nv, c, c]
        A = (bc * decays * (kc @ kc.transpose(-1, -2))).tril(-1)
        grown = G.exp().float()[..., None]  # exp(G_t) [nv, c, 1]
        W = torch.linalg.solve_triangular(A, torch.cat((bc * vc, bc * grown * kc), -1), upper=False, unitriangular=True)
        U, Wk = W.split([vc.shape[-1], kc.shape[-1]], -1)
        W = U - Wk @ S  # [nv, c, dv]
        out.append(((grown * qc) @ S + ((qc @ kc.transpose(-1, -2)) * decays) @ W).transpose(0, 1))
        S = grown[:, -1:] * S + (kc * (G[:, -1:] - G).exp().float()[..., None]).transpose(-1, -2) @ W
    return torch.cat(out), S


class OffsetRMSNorm(nn.Module):
    """RMSNorm scaled by (1 + weight), computed in fp32 (Qwen3-Next, Qwen3.5)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """weight * RMSNorm(x), times SiLU(gate): the linear attention's output norm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf.to(dtype) * rounded_once(F.silu, gate.float())).to(dtype)


def layer_types(cfg: dict) -> list[str]:
    layers = need(cfg, "num_hidden_layers", kind=int)
    types = cfg.get("layer_types")
    if types is None:
        interval = need(cfg, "full_attention_interval", default=4, kind=int) or 4
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    if len(types) != layers or any(t not in ("linear_attention", "full_attention") for t in types):
        raise CheckpointError(
            "config.json layer_types must list 'linear_attention' or 'full_attention' for each of the "
            f"{layers} layers; fix the file"
        )
    return list(types)


class GatedAttention(Attention):
    """Full attention with an output gate beside each head's query (module docstring)."""

    def __init__(self, cfg: dict, spec):
        super().__init__(spec)
        s = spec
        self.q_proj = nn.Linear(s.hidden, 2 * s.heads * s.head_dim, bias=s.qkv_bias)
        self.q_norm = OffsetRMSNorm(s.head_dim, s.norm_eps)
        self.k_norm = OffsetRMSNorm(s.head_dim, s.norm_eps)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, rope: tuple) -> torch.Tensor:
        s, T = self.s, x.shape[0]
        q, k, v = self.project_qkv(x)
        q, gate = q.view(T, s.heads, 2 * s.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(0, 1)  # [H, T, d]
        k = self.k_norm(k.view(T, s.kv_heads, s.head_dim)).transpose(0, 1)
        v = v.view(T, s.kv_heads, s.head_dim).transpose(0, 1)
        cos, sin = rope
        q, k = self.rotate_qk(q, k, cos, sin)
        start = cache.length
        k_all, v_all = cache.write(layer, k, v)
        out = self.core(q, k_all, v_all, start)
        return self.o_proj(out * rounded_once(torch.sigmoid, gate.reshape(T, -1)))


class GatedDeltaNet(nn.Module):
    """Linear attention with the gated delta rule (module docstring); HF names."""

    def __init__(self, cfg: dict, hidden: int, eps: float):
        super().__init__()
        self.nk = need(cfg, "linear_num_key_heads", kind=int)
        self.nv = need(cfg, "linear_num_value_heads", kind=int)
        self.dk = need(cfg, "linear_key_head_dim", kind=int)
        self.dv = need(cfg, "linear_value_head_dim", kind=int)
        self.taps = need(cfg, "linear_conv_kernel_dim", default=4, kind=int)
        if not self.nk or self.nv % self.nk:
            raise CheckpointError(
                "config.json linear_num_value_heads must be a multiple of linear_num_key_heads; fix the file"
            )
        key_dim, value_dim = self.nk * self.dk, self.nv * self.dv
        self.conv_dim = 2 * key_dim + value_dim
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.taps, groups=self.conv_dim, bias=False)
        self.projections(hidden, key_dim, value_dim)
        self.dt_bias = nn.Parameter(torch.ones(self.nv))
        self.A_log = nn.Parameter(torch.zeros(self.nv))
        self.norm = GatedRMSNorm(self.dv, eps)
        self.out_proj = nn.Linear(value_dim, hidden, bias=False)

    def kv_dims(self) -> tuple[int, int, int, int]:
        """No per-token KV cache: a fixed-size state (``state_bytes``)."""
        return self.nv, 0, 0, 0

    def state_bytes(self) -> int:
        return self.conv_dim * (self.taps - 1) * 4 + self.nv * self.dk * self.dv * 4

    def projections(self, hidden: int, key_dim: int, value_dim: int) -> None:
        """Qwen3-Next: q, k, v, z in one projection and b, a in another, grouped per key head."""
        self.in_proj_qkvz = nn.Linear(hidden, 2 * key_dim + 2 * value_dim, bias=False)
        self.in_proj_ba = nn.Linear(hidden, 2 * self.nv, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> (q|k|v [C, T] as the convolution takes them, z [T, nv, dv], b [T, nv], a [T, nv])."""
        T, nk, nv, dk, dv = x.shape[0], self.nk, self.nv, self.dk, self.dv
        r = nv // nk
        q, k, v, z = self.in_proj_qkvz(x).view(T, nk, 2 * dk + 2 * r * dv).split([dk, dk, r * dv, r * dv], dim=-1)
        b, a = self.in_proj_ba(x).view(T, nk, 2 * r).split([r, r], dim=-1)
        mixed = torch.cat((q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)), dim=-1).t()
        return mixed, z.reshape(T, nv, dv), b.reshape(T, nv), a.reshape(T, nv)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, rope: tuple) -> torch.Tensor:
        T, nk, nv, dk, dv = x.shape[0], self.nk, self.nv, self.dk, self.dv
        r = nv // nk
        mixed, z, b, a = self.project(x)  # [C, T], ...
        prev = cache.state(layer)
        if prev is None:
            conv_prev = mixed.new_zeros(self.conv_dim, self.taps - 1)
            S = x.new_zeros(nv, dk, dv, dtype=torch.float32)
        else:
            conv_prev, S = prev
        full = torch.cat((conv_prev.to(mixed.dtype), mixed), dim=-1)  # [C, taps - 1 + T]
        del mixed  # (a prompt's workspace: each tensor let go once the next is made)
        conv = F.conv1d(full[None], self.conv1d.weight.to(full.dtype), groups=self.conv_dim)[0]
        step = CHUNK if conv.is_cpu else T  # on the CPU, rounded_once's float64 copies a chunk at a time
        for s in range(0, T, step):
            conv[:, s : s + step] = rounded_once(F.silu, conv[:, s : s + step])
        conv = conv.t()
        q, k, v = conv.split([nk * dk, nk * dk, nv * dv], dim=-1)
        q = q.reshape(T, nk, dk).float().repeat_interleave(r, dim=1)
        k = k.reshape(T, nk, dk).float().repeat_interleave(r, dim=1)
        v = v.reshape(T, nv, dv).float()
        del conv
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) / dk**0.5
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
        beta = rounded_once(torch.sigmoid, b.float())
        log_decay = rounded_once(
            lambda g: -self.A_log.to(g.dtype).exp() * F.softplus(g), a.float() + self.dt_bias.float()
        )
        start = cache.length
        if T > 1 and not cache.keeps(start + T - 1, start + T):  # a prompt: only its last state is kept
            o, S = delta_chunks(q, k, v, beta, log_decay, S)
            kept = {T - 1: S}
        else:
            decay = rounded_once(torch.exp, log_decay)
            o, kept = delta_steps(q, k, v, beta, decay, S, lambda t: cache.keeps(start + t + 1, start + T))
        cache.save_states(layer, {start + t + 1: (full[:, t + 1 : t + self.taps].clone(), s) for t, s in kept.items()})
        del full, q, k, v
        normed = torch.empty(T, nv * dv, dtype=x.dtype, device=x.device)
        for s in range(0, T, CHUNK):  # the gated norm's float copies a chunk at a time
            rows = slice(s, s + CHUNK)
            normed[rows] = self.norm(o[rows].to(x.dtype).reshape(-1, dv), z[rows].reshape(-1, dv)).view(-1, nv * dv)
        del o, z
        return self.out_proj(normed)


class Model(CausalLM):
    rotary_default = 0.25  # partial_rotary_factor when config.json names none
    delta_net = GatedDeltaNet
    always_normalize = False  # Qwen3.5 renormalises the top-k weights whatever config.json says
    # config.json without norm_topk_prob: transformers' Qwen3-Next default (renormalise)

    def __init__(self, cfg: dict):
        c = self.config = parse(cfg)
        bias = bool(cfg.get("attention_bias", False))
        spec = attention_spec(cfg, qkv_bias=bias, o_bias=bias)
        spec.window = None
        spec.rotary_dim = partial_rotary_dim(cfg, spec.head_dim, self.rotary_default)
        eps = spec.norm_eps

        def norm() -> nn.Module:
            return OffsetRMSNorm(c.hidden_size, eps)

        route = softmax_topk(c.top_k, normalize=self.always_normalize or bool(cfg.get("norm_topk_prob", True)))
        shared_inter = need(cfg, "shared_expert_intermediate_size", kind=int)
        layers = []
        for i, kind in enumerate(layer_types(cfg)):
            if i in c.moe_layers:
                mlp: nn.Module = SharedExpertMoE(c.hidden_size, c.num_experts, route, shared_inter)
            else:
                mlp = GatedMLP(c.hidden_size, need(cfg, "intermediate_size", kind=int))
            if kind == "linear_attention":
                mixer = self.delta_net(cfg, c.hidden_size, eps)
                layers.append(DecoderLayer(mixer, mlp, norm, attn_name="linear_attn"))
            else:
                layers.append(DecoderLayer(GatedAttention(cfg, spec), mlp, norm))
        super().__init__(Backbone(c.vocab_size, c.hidden_size, layers, norm()), c.vocab_size, c.hidden_size)
        self.rotary = make_rotary(rope_parameters(cfg), spec.rotary_dim, cfg.get("max_position_embeddings", 4096))
