"""Primitives shared by every architecture: norms, attention with a truncatable KV cache,
the gated MLP, and the sparse MoE block that delegates expert compute to an executor.

This module knows nothing about where expert weights live. A MoE block computes its
router's decision, then hands ``(layer, x, expert_ids, weights)`` to the model's
``experts`` executor: in memory on the CPU (runtime/executors/experts.py), or through the
offloading cache. That is the one seam the whole runtime hangs on.

Shapes: a batch is one sequence, so activations are ``[T, hidden]``; attention works on
``[heads, T, head_dim]``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moespeq_cli.models.rope import Rotary, apply_rope, rope_rows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``weight * (x / rms(x))`` as transformers computes it: normalized in float32 and
        rounded to x's dtype, then times the weight. torch's kernel normalizes in float32
        whatever x's dtype, so this is two ops in every dtype (the formula dispatches six,
        widening and narrowing two more: on a GPU, launches) and the same bits as
        transformers' in float32, bfloat16 and float16. One op sequence for every dtype: the
        mock, computing a bf16 GPU's work in float32, counts the ops the GPU launches."""
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def rounded_once(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` (an elementwise exp, sigmoid, SiLU, softplus) computed in float64 and
    rounded once to x's dtype. torch's float32 transcendentals run a vector body over whole
    blocks of a tensor and a scalar loop over its tail, which round differently; which of a
    token's elements fall in the tail depends on how many tokens share the tensor, so a
    verification block's values would differ from single steps' in the last bit (and a
    greedy token could flip on a near-tie). The two float64 paths agree to well below a
    float32 rounding. Off the CPU ``fn(x)`` as it is (a GPU computes every element alike;
    the two casts would be two more launches)."""
    return fn(x.double()).to(x.dtype) if x.is_cpu else fn(x)


GATE_ACTIVATIONS: dict[str, Callable] = {  # a gated MLP's or expert's gate activation, by name
    "silu": F.silu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu": F.gelu,
}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): dense layers and shared experts (HF names); ``act`` (a
    key of GATE_ACTIVATIONS) SiLU unless the family says otherwise (Gemma 4: GELU)."""

    def __init__(self, hidden: int, inter: int, bias: bool = False, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act_name = act  # the CPU kernels compute it by name
        self.act = GATE_ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


# positions before its latest pass's first token a cache can still be cut back to: a cycle's
# draft, written a token at a time (--spec-depth at most 64), is cut back to its start
ROLLBACK = 65


def window_keep(window: int) -> int:
    """Positions a sliding-window layer keeps before a pass's first token: those its
    queries can see (``window - 1``) and those a rollback can return to (``ROLLBACK``)."""
    return window - 1 + ROLLBACK


def window_bound(window: int, context: int | None) -> int:
    """The most positions a sliding-window layer's buffer holds (twice ``window_keep``:
    it drops the oldest when past it), or ``context`` where that is less."""
    bound = 2 * window_keep(window)
    return bound if context is None else min(context, bound)


class KVCache:
    """Per-layer key/value buffers ``[kv_heads, capacity, dim]`` with one shared length.

    ``truncate(n)`` forgets every position >= n; speculative decoding uses it to roll
    back rejected draft tokens. Buffers grow by doubling, so appends are amortised O(1),
    but never past ``capacity`` (the context the plan reserved memory for) unless a write
    needs more: a 3,000-token context grows 64 -> ... -> 2,048 -> 3,000, not to 4,096.

    A sliding-window layer (``windows``: layer -> window; gpt-oss's every other layer,
    Gemma 4's local ones) holds only its last positions: ``window_keep`` of them before a
    pass, in a buffer of twice that, which drops the oldest (moving the rest to its front)
    when full, so it never holds more than ``2 * window_keep`` positions however long the
    context. A pass longer than ``window_keep`` (a prefill) attends over a transient of
    what it holds and the pass's own keys, and keeps the last ``window_keep`` of them.
    ``offset(layer)``: the position index 0 of what the layer's last ``write`` (or
    ``reserve``) returned holds; attention indexes from there.

    Linear-attention layers (Qwen3-Next's Gated DeltaNet) keep a recurrent state instead
    of keys and values: ``states[layer]`` maps a position to the state after it. A pass
    over T tokens stores the state after each of them, so ``truncate`` can roll back to
    any accepted prefix; ``keep_from(n)`` (speculative decoding, at each cycle's start)
    keeps every state from position n on until the next cycle, and without it only the
    newest state is kept.

    For a model whose rotary tables change past a length (LongRoPE), ``ids`` holds the
    tokens at positions [0, length) (after ``truncate``, a stale tail past it until the
    next pass) and ``regime`` the tables every position was rotated with, so that
    ``CausalLM.__call__`` can recompute the cache when a pass crosses over.
    """

    def __init__(self, num_layers: int, capacity: int | None = None, windows: dict[int, int] | None = None):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0
        self.capacity = capacity
        self.windows = dict(windows or {})
        self.base = [0] * num_layers  # the position each layer's buffers begin at
        self.view = [0] * num_layers  # the position index 0 of the last write's keys holds
        self.states: dict[int, dict[int, tuple]] = {}
        self.floor: int | None = None
        self.ids: list[int] = []
        self.regime = 0

    def clear(self) -> None:
        """Forget every position (the buffers are kept for the next writes)."""
        self.length, self.states, self.ids, self.regime = 0, {}, [], 0
        self.base = [0] * len(self.base)
        self.view = [0] * len(self.view)

    def offset(self, layer: int) -> int:
        """The position index 0 of the keys the layer's last ``write`` or ``reserve``
        returned holds: 0, but for a sliding-window layer that has dropped positions its
        window passed."""
        return self.view[layer]

    def keep_from(self, n: int | None) -> None:
        self.floor = n

    def state(self, layer: int) -> tuple | None:
        """The layer's recurrent state at the current length (None: before the first token)."""
        hist = self.states.get(layer)
        if self.length == 0:
            return None
        if not hist or self.length not in hist:
            raise RuntimeError(f"no recurrent state of layer {layer} at position {self.length}")
        return hist[self.length]

    def keeps(self, pos: int, last: int) -> bool:
        """Whether the state after position ``pos`` of a pass ending at ``last`` is kept:
        the last one, and with ``keep_from`` every one from there on (a long prefill
        never holds a state per prompt token)."""
        return pos == last or (self.floor is not None and pos >= self.floor)

    def save_states(self, layer: int, per_token: dict[int, tuple]) -> None:
        """The states after the pass's tokens, by position (length+1 .. length+T; only
        those ``keeps`` asks for)."""
        hist = self.states.setdefault(layer, {})
        hist.update(per_token)
        # (the pass's last state always: a long prompt's next part continues from it, even
        # where a cycle's floor lies beyond it)
        keep = max(per_token) if self.floor is None else min(self.floor, max(per_token))
        for pos in [p for p in hist if p < keep]:
            del hist[pos]

    def reserve(self, layer: int, T: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's buffers, made to hold T more positions (a sliding-window layer's by
        dropping positions no query will see again, else grown, keeping positions below
        ``length``); index 0 holds position ``offset(layer)``. ``k``, ``v``: tensors
        ``[kv_heads, *, d]`` of the buffers' kind."""
        start, end, base = self.length, self.length + T, self.base[layer]
        kb, vb = self.k[layer], self.v[layer]
        size = 0 if kb is None else kb.shape[1]
        limit, window = self.capacity, self.windows.get(layer)
        if window is not None:
            keep, limit = window_keep(window), window_bound(window, limit)
            if end - base > limit and start - keep > base:  # past its bound: keep the last ``keep`` positions
                drop = start - keep - base
                kb[:, : start - base - drop] = kb[:, drop : start - base].clone()
                vb[:, : start - base - drop] = vb[:, drop : start - base].clone()
                self.base[layer] = base = start - keep
        self.view[layer] = base
        if end - base > size:
            cap = max(2 * size, 64)
            cap = max(end - base, min(cap, limit) if limit else cap)
            nk = k.new_empty(k.shape[0], cap, k.shape[2])
            nv = v.new_empty(v.shape[0], cap, v.shape[2])
            if kb is not None:
                nk[:, : start - base] = kb[:, : start - base]
                nv[:, : start - base] = vb[:, : start - base]
            self.k[layer], self.v[layer] = kb, vb = nk, nv
        return kb, vb

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v ``[kv_heads, T, d]`` at positions [length, length+T); return the keys
        and values from ``offset(layer)`` on (every position, but a sliding-window layer's)."""
        window = self.windows.get(layer)
        if window is not None and k.shape[1] > window_keep(window):
            return self._write_long(layer, k, v, window)
        kb, vb = self.reserve(layer, k.shape[1], k, v)
        start = self.length - self.base[layer]
        end = start + k.shape[1]
        kb[:, start:end] = k
        vb[:, start:end] = v
        return kb[:, :end], vb[:, :end]

    def _write_long(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, window: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A sliding-window layer's pass of more than ``window_keep`` positions: its queries
        see the ``keep`` held positions before it and its own, joined for this pass only;
        the buffer keeps the pass's last ``keep``."""
        keep, size = window_keep(window), max(window_bound(window, self.capacity), window_keep(window))
        start, end, base = self.length, self.length + k.shape[1], self.base[layer]
        kb, vb = self.k[layer], self.v[layer]
        lo = max(base, start - keep)
        if kb is None or lo == start:
            k_all, v_all = k, v
        else:
            k_all = torch.cat((kb[:, lo - base : start - base], k), dim=1)
            v_all = torch.cat((vb[:, lo - base : start - base], v), dim=1)
        if kb is None or kb.shape[1] < size:
            kb = k.new_empty(k.shape[0], size, k.shape[2])
            vb = v.new_empty(v.shape[0], size, v.shape[2])
            self.k[layer], self.v[layer] = kb, vb
        kb[:, :keep] = k[:, -keep:]
        vb[:, :keep] = v[:, -keep:]
        self.base[layer], self.view[layer] = end - keep, lo
        return k_all, v_all

    def can_truncate(self, n: int) -> bool:
        """Whether ``truncate(n)`` leaves a usable cache: n within the length, every
        linear-attention layer holding its state at n, and every sliding-window layer the
        positions a query at n sees."""
        return 0 <= n <= self.length and all(n in hist for hist in self.states.values()) and self._windows_hold(n)

    def _windows_hold(self, n: int) -> bool:
        """Whether every sliding-window layer holds the positions a query at n sees."""
        return n == 0 or all(self.base[i] <= max(0, n - w + 1) for i, w in self.windows.items())

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {n}")
        if not self._windows_hold(n):
            raise ValueError(f"cannot truncate to {n}: a sliding-window layer no longer holds what it would see")
        if n == 0:
            self.base = [0] * len(self.base)
            self.view = [0] * len(self.view)
        self.length = n
        for hist in self.states.values():
            for pos in [p for p in hist if p > n]:
                del hist[pos]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync: to a GPU through pinned memory
    with ``non_blocking`` (a pageable copy makes the host wait for the stream, once every
    forward pass), anywhere else as ``.to``."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def causal_mask(start: int, T: int, L: int, window: int | None, device) -> torch.Tensor | None:
    """[T, L] True where query ``start + t`` may see key ``l`` (within ``window`` of it,
    when given); None when every query sees every key: one query at the last position
    (a decoding step) and no window shorter than the keys."""
    if T == 1 and start == L - 1 and not (window and L > window):
        return None
    qpos = torch.arange(start, start + T, device=device)[:, None]
    kpos = torch.arange(L, device=device)[None, :]
    mask = kpos <= qpos  # [T, L]
    if window:
        mask &= kpos > qpos - window
    return mask


# A masked pass goes in tiles of query rows: at most a verification's (``ROLLBACK``, so
# that decoding and verifying stay one call a layer), and at most ``MASK_ELEMS`` scores
# [heads, rows, keys] (a GPU's fused kernels take no mask with grouped heads: its math
# kernel then holds a tile's scores and softmax in fp32, and the keys and values repeated
# per head). A prompt over an empty cache needs no mask.
MASK_ELEMS = 1 << 24


def tile_rows(heads: int, T: int, L: int) -> int:
    """Query rows a tile of a masked pass of ``T`` rows over ``L`` keys."""
    return max(1, min(T, ROLLBACK, MASK_ELEMS // max(1, heads * L)))


def in_tiles(T: int, rows: int, tile: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """``tile(t0, n)``'s outputs ``[n, ...]`` for query rows [t0, t0 + n), ``rows`` at a
    time, joined (one tile: its output as it is)."""
    return tile(0, T) if rows >= T else parts_joined(T, rows, lambda a, b: tile(a, b - a))


def parts_joined(T: int, step: int, part: Callable[[int, int], torch.Tensor | None]) -> torch.Tensor | None:
    """``part(a, b)``'s outputs for rows [a, b), ``step`` at a time, written into one
    ``[T, ...]`` tensor as they come (None where a part gives None: a family without
    shared experts)."""
    out = None
    for a in range(0, T, step):
        b = min(T, a + step)
        y = part(a, b)
        if y is None:
            return None
        if out is None:
            out = y.new_empty((T, *y.shape[1:]))
        out[a:b] = y
    return out


def attention_scratch(heads: int, context: int, elem: int, repeated: int = 0) -> int:
    """Bytes a tile of ``attend`` holds at most over ``context`` keys (``scratch_bytes``):
    its scores and softmax in fp32, its mask and additive copy, ``repeated`` elements of
    keys and values expanded per head."""
    rows = tile_rows(heads, context, context)
    return heads * rows * context * 8 + rows * context * (1 + elem) + repeated * elem


def in_window(k: torch.Tensor, v: torch.Tensor, start: int, T: int, window: int | None) -> tuple:
    """One query's keys and values cut to its window (the last ``window`` positions), so
    that a decoding step builds no mask: ``(k, v, start)``."""
    L = k.shape[1]
    if T == 1 and window and L > window:
        return k[:, L - window :], v[:, L - window :], start - (L - window)
    return k, v, start


def folds_groups(q: torch.Tensor) -> bool:
    """Whether a masked pass with grouped heads takes each kv head's group of query heads as
    the rows of one head: on a GPU, where SDPA takes a mask with grouped heads on its math
    kernel only, the keys and values repeated for every query head at each tile (a 32K
    cache of Mixtral's: 0.5 GiB a tile, and a verification is a tile); with equal heads its
    memory-efficient kernel takes the mask and reads the cache as it is. Not on the CPU,
    whose fused kernel takes grouped heads with a mask and repeats nothing (the rows'
    mask, repeated for each head of a group, would be the larger)."""
    return not q.is_cpu


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float, window: int | None = None
) -> torch.Tensor:
    """Causal attention of T new queries at positions [start, start+T) over all keys.
    q: [H, T, d]; k, v: [Hkv, L, d]; returns [T, H * dv]. A prompt over an empty cache (a
    long one's first part) uses SDPA's own causal mask (a [T, T] mask of 32K tokens is
    1 GiB, and a GPU's kernels take it as 2 GiB more); a masked pass goes in tiles of query
    rows (``folds_groups``: on a GPU each kv head's group of query heads as one head's rows)."""
    T = q.shape[1]
    k, v, start = in_window(k, v, start, T, window)
    L, gqa = k.shape[1], k.shape[0] != q.shape[0]
    if T > 1 and start == 0 and T == L and not window:
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=gqa)
        return out[0].transpose(0, 1).reshape(T, -1)
    H, Hkv = q.shape[0], k.shape[0]
    folded = gqa and folds_groups(q)

    def tile(t0: int, n: int) -> torch.Tensor:
        mask = causal_mask(start + t0, n, L, window, q.device)
        if folded:  # query head h is kv head h // g's: rows (h % g, t) of head h // g
            g = H // Hkv
            rows = q[:, t0 : t0 + n].reshape(Hkv, g * n, -1)
            mask = None if mask is None else mask.repeat(g, 1)
            out = F.scaled_dot_product_attention(rows[None], k[None], v[None], attn_mask=mask, scale=scale)[0]
            return out.reshape(H, n, -1).transpose(0, 1).reshape(n, -1)
        out = F.scaled_dot_product_attention(
            q[None, :, t0 : t0 + n], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=gqa
        )[0]  # [H, n, dv]
        return out.transpose(0, 1).reshape(n, -1)

    return in_tiles(T, tile_rows(q.shape[0], T, L), tile)


# A pass longer than this (a long prompt) goes through each layer's attention, dense MLPs and
# shared experts this many tokens at a time, each part a pass continuing the layer's cache.
# The routed experts still take the whole pass in one call, so that an offloading executor
# copies each expert once a layer (an expert computes its rows a part at a time,
# executors/experts.py; grouped calls bound their own parts, executors/grouped.py): a layer
# holds its residual stream and its MoE block's input and output over the whole prompt (a
# few times ``context x hidden``) and one part's activations, not every token's at once.
# The planner reserves what this holds (planning/planner.py ``activation_bytes``): Mixtral
# at 32K tokens on a 12 GB card needed 4.4 GiB of workspace and was refused, 2.9 GiB now.
# llama.cpp's default micro-batch is 512 tokens, vLLM's chunked prefill 2,048 to 8,192.
PREFILL_PART = 2048


def rows_in_parts(fn: Callable[[torch.Tensor], torch.Tensor | None], x: torch.Tensor) -> torch.Tensor | None:
    """``fn(x)`` for a row-wise ``fn`` (a dense MLP, shared experts), in parts of
    ``PREFILL_PART`` rows where x has more."""
    T = x.shape[0]
    return fn(x) if T <= PREFILL_PART else parts_joined(T, PREFILL_PART, lambda a, b: fn(x[a:b]))


def attention_in_parts(attn: nn.Module, x: torch.Tensor, layer: int, cache: KVCache, rope) -> torch.Tensor:
    """``attn(x, layer, cache, rope)``, in parts of ``PREFILL_PART`` rows where the pass has
    more: each part a pass continuing the layer's cache from its first position (the
    cache's length is set there while the part runs, and restored: a layer's parts all run
    before the next layer's, whose cache has not advanced), with its rows' rotary tables."""
    T = x.shape[0]
    if T <= PREFILL_PART:
        return attn(x, layer, cache, rope)
    start = cache.length

    def part(a: int, b: int) -> torch.Tensor:
        cache.length = start + a
        return attn(x[a:b], layer, cache, rope_rows(rope, a, b))

    try:
        return parts_joined(T, PREFILL_PART, part)
    finally:
        cache.length = start


@dataclass
class AttentionSpec:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # "head" (Qwen3: per head), "full" (OLMoE: whole projection)
    norm_eps: float = 1e-6
    clip_qkv: float | None = None
    window: int | None = None
    rotary_dim: int | None = None  # rotate only the first rotary_dim dims of each head (GLM); None: all


class Attention(nn.Module):
    """Grouped-query attention with rotary positions (Mixtral, Qwen-MoE, OLMoE, Phi-MoE)."""

    def __init__(self, s: AttentionSpec):
        super().__init__()
        self.s = s
        self.q_proj = nn.Linear(s.hidden, s.heads * s.head_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=s.qkv_bias)
        self.o_proj = nn.Linear(s.heads * s.head_dim, s.hidden, bias=s.o_bias)
        if s.qk_norm == "head":
            self.q_norm = RMSNorm(s.head_dim, s.norm_eps)
            self.k_norm = RMSNorm(s.head_dim, s.norm_eps)
        elif s.qk_norm == "full":
            self.q_norm = RMSNorm(s.heads * s.head_dim, s.norm_eps)
            self.k_norm = RMSNorm(s.kv_heads * s.head_dim, s.norm_eps)
        self.scale = s.head_dim**-0.5
        self.rotate = apply_rope  # the CPU kernels swap in their one-call rotation

    def kv_dims(self) -> tuple[int, int, int, int]:
        """(query heads, cached kv heads, key dim, value dim)."""
        return self.s.heads, self.s.kv_heads, self.s.head_dim, self.s.head_dim

    def scratch_bytes(self, context: int, elem: int) -> int:
        """What a pass's attention over ``context`` positions holds besides its output, at
        most (the planner's workspace): a tile's mask and its additive copy, its scores and
        their softmax in fp32 (``attend``: a GPU's math kernel), and the keys and values
        repeated for each query head."""
        return attention_scratch(
            self.s.heads, context, elem, self.s.heads * context * (self.kv_dims()[2] + self.kv_dims()[3])
        )

    def rotate_qk(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        r = self.s.rotary_dim
        if r is None and self.rotate is apply_rope:  # torch's ops: queries and keys rotated at once
            qk = apply_rope(torch.cat((q, k)), cos, sin)
            return qk[: q.shape[0]], qk[q.shape[0] :]
        if r is None:
            return self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        # partial rotary: the rest of each head passes through unrotated
        q = torch.cat((self.rotate(q[..., :r], cos, sin), q[..., r:]), dim=-1)
        k = torch.cat((self.rotate(k[..., :r], cos, sin), k[..., r:]), dim=-1)
        return q, k

    def fuse_qkv(self, product: Callable) -> None:
        """q, k and v in one product ``product(x, w, b)`` (the CPU kernels): their weights
        (and biases) become views of one buffer, so nothing is held twice and the module's
        parameters keep their names."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        w = rows_joined([p.weight for p in projs])
        b = rows_joined([p.bias for p in projs]) if self.s.qkv_bias else None
        sizes = [p.out_features for p in projs]
        for p, wp, bp in zip(projs, w.split(sizes), b.split(sizes) if b is not None else (None,) * 3, strict=True):
            p.weight = nn.Parameter(wp, requires_grad=False)
            if bp is not None:
                p.bias = nn.Parameter(bp, requires_grad=False)
        self.fused_qkv = (product, w, b, sizes)
        s = self.s
        plain = s.qk_norm is None or (
            s.qk_norm == "head"
            and type(self.q_norm) is type(self.k_norm) is RMSNorm
            and self.q_norm.eps == self.k_norm.eps
        )
        if plain and s.clip_qkv is None and s.rotary_dim is None and sizes[0] == s.heads * s.head_dim:
            # queries then keys, side by side in the product's output, are normalized and
            # rotated as one [T, H + Hkv, d] view: each norm's weight repeated per head
            # (a few KiB a layer)
            self.qk_weight = None
            if s.qk_norm == "head":
                d = s.head_dim
                parts = [self.q_norm.weight.expand(s.heads, d), self.k_norm.weight.expand(s.kv_heads, d)]
                self.qk_weight = rows_joined(parts)

    def joint_qkv(self, x: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [H, T, d], k and v [Hkv, T, d], rotated, from one product: queries and keys as
        one view of its output, normalized (Qwen3's per-head norms: one ``rms_norm`` and
        one product by ``qk_weight``) and rotated together, no copy joining them -- the
        same bits as normalizing and rotating each, in 6 ops where that takes 9 (the same
        path without norms: 4 where it takes 5). Over several tokens the norm takes a
        strided view, which a GPU kernel may copy first (a launch not counted here; the
        separate path's views were strided too)."""
        s, T = self.s, x.shape[0]
        product, w, b, sizes = self.fused_qkv
        out = product(x, w, b)
        n = sizes[0] + sizes[1]
        qk = out[:, :n].view(T, s.heads + s.kv_heads, s.head_dim)
        if self.qk_weight is not None:
            qk = self.qk_weight * F.rms_norm(qk, (s.head_dim,), eps=self.q_norm.eps)
        cos, sin = rope
        qk = apply_rope(qk.transpose(0, 1), cos, sin)
        v = out[:, n:].view(T, s.kv_heads, s.head_dim).transpose(0, 1)
        return qk[: s.heads], qk[s.heads :], v

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fused = getattr(self, "fused_qkv", None)
        if fused is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        product, w, b, sizes = fused
        return product(x, w, b).split(sizes, dim=-1)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, rope: tuple) -> torch.Tensor:
        if hasattr(self, "qk_weight") and self.rotate is apply_rope:  # the CPU kernels rotate their own way
            q, k, v = self.joint_qkv(x, rope)
        else:
            q, k, v = self.separate_qkv(x, rope)
        k_all, v_all = cache.write(layer, k, v)
        return self.o_proj(self.core(q, k_all, v_all, cache.length - cache.offset(layer)))

    def separate_qkv(self, x: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [H, T, d], k and v [Hkv, T, d], rotated: each projected, normalized, clipped
        and rotated on its own."""
        s, T = self.s, x.shape[0]
        q, k, v = self.project_qkv(x)  # [T, H*d], [T, Hkv*d] x2
        if s.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if s.clip_qkv is not None:
            q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
        q = q.view(T, s.heads, s.head_dim)
        k = k.view(T, s.kv_heads, s.head_dim)
        if s.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # [H, T, d], [Hkv, T, d]
        v = v.view(T, s.kv_heads, s.head_dim).transpose(0, 1)
        cos, sin = rope
        q, k = self.rotate_qk(q, k, cos, sin)
        return q, k, v

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """The attention itself (after projections, norms and rotary): [H, T, d] queries
        over the cached [Hkv, L, d] keys and values -> [T, H * d]."""
        return attend(q, k, v, start, self.scale, self.s.window)


def rows_joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``; on the meta device (a plan's shape-only model) an empty tensor
    of the joined shape: torch's meta ``cat`` imports torch._dynamo on first use, 1.2 s of
    a first run's 2.2 before its first token."""
    if parts[0].is_meta:
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        return torch.empty(shape, dtype=parts[0].dtype, device="meta")
    return torch.cat(parts)


def fuse_attention_projections(model: nn.Module, product: Callable = F.linear) -> None:
    """Every attention's q, k and v computed by one ``product`` (a GPU: one launch instead
    of three; their weights become views of one buffer)."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.fuse_qkv(product)


class ExpertExecutor(Protocol):
    """Computes ``sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`` for one MoE layer.

    ``rows`` is ``ids`` read to the host (``ids.tolist()``), read once per layer by the
    block; ``ahead`` the host copy of what ``lookahead`` returned, read with it."""

    def __call__(
        self,
        layer: int,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        rows: list[list[int]],
        ahead: list[int] | None = None,
    ) -> torch.Tensor: ...

    def lookahead(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Device values the executor wants on the host with this layer's routing (e.g.
        gate-prefetch's routing of the next layer), or None."""


def read_routing(ids: torch.Tensor, extra: torch.Tensor | None = None) -> tuple[list[list[int]], list[int] | None]:
    """``ids [T, k]`` (and ``extra``, flattened) brought to the host in one read: on a GPU
    the one sync a MoE layer makes (the host needs the routing to decide copies). ``ids
    [T, 2, k]``: a paired router's (``SparseMoE.pair``), the next layer's guess beside."""
    if ids.dim() == 3:
        both = ids.tolist()
        return [r[0] for r in both], [e for r in both for e in r[1]]
    if extra is None:
        return ids.tolist(), None
    n, k = ids.numel(), ids.shape[1]
    both = torch.cat([ids.flatten(), extra.flatten().to(ids.dtype)]).tolist()
    return [both[i : i + k] for i in range(0, n, k)], both[n:]


class Fp32Router(nn.Linear):
    """A router whose product is float32 whatever the weight's dtype (DeepSeek, GLM: as
    transformers computes it). Its own forward, so that calling it fires its cost hooks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


class SparseMoE(nn.Module):
    """Router (``gate``) + routed experts (computed by the executor) + optional shared MLP.

    ``route(logits)`` is the family's routing rule: it returns ``ids [T, k]`` and
    ``weights [T, k]``. The routed experts' weights are not parameters of this module:
    the executor owns them, so they can live anywhere (host RAM, a device cache, 4-bit).
    """

    def __init__(self, hidden: int, num_experts: int, route: Callable, gate_fp32: bool = False):
        super().__init__()
        self.gate = (Fp32Router if gate_fp32 else nn.Linear)(hidden, num_experts, bias=False)
        self.route = route
        self.layer = -1
        self.experts: ExpertExecutor | None = None
        self.observer: Callable | None = None
        self.pair: torch.Tensor | None = None  # this router's rows and the next MoE layer's (``CausalLM.pair_routers``)
        self.read_routing = read_routing  # the one host read of the routing (``plan`` counts ops on meta)

    def name_router(self, name: str, module: nn.Module) -> None:
        """The router is the checkpoint's ``name`` (gpt-oss: ``router``; Gemma 4: ``proj``):
        registered under that name, and still reached as ``gate`` by the runtime (hooks,
        costs, gate-prefetch), held outside the module tree so that it is named once."""
        del self.gate
        setattr(self, name, module)
        self.__dict__["gate"] = module

    def router_logits(self, x: torch.Tensor, hooked: bool = True) -> torch.Tensor:
        """``hooked``: through the gate module (its forward hooks fire); False: the same
        product without them (gate-prefetch applies a later layer's router early)."""
        return self.gate(x) if hooked else self.gate.forward(x)  # forward(): no hooks

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The experts ``route`` chooses (``ids [T, k]``), without their weights:
        gate-prefetch's guess, in one op where the family's rule says how (``select``)."""
        select = getattr(self.route, "select", None)
        return select(logits) if select is not None else self.route(logits)[0]

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def expert_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the routed experts compute on: the router's input, in most families."""
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paired = getattr(self.experts, "paired_logits", None) if self.pair is not None else None
        logits = paired(self.layer, x) if paired is not None else None  # [T, 2E]: the target's passes
        if logits is not None:  # one top-k: this layer's routing and the next's guess
            both, weights = self.route.paired(logits.view(x.shape[0], 2, -1))  # [T, 2, k], [T, k]
            ids = both[:, 0]
            rows, ahead = self.read_routing(both)
        else:
            ids, weights = self.route(self.router_logits(x))  # [T, k], [T, k]
            lookahead = getattr(self.experts, "lookahead", None)
            rows, ahead = self.read_routing(ids, lookahead(self.layer, x) if lookahead is not None else None)
        if self.observer is not None:
            self.observer(self.layer, rows)
        out = self.experts(self.layer, self.expert_input(x), ids, weights, rows, ahead)
        extra = self.shared(x) if x.shape[0] <= PREFILL_PART else rows_in_parts(self.shared, x)
        return out if extra is None else out + extra


def softmax_topk(top_k: int, normalize: bool, keep_fp32: bool = False) -> Callable:
    """Softmax over all experts in fp32, keep the top k, optionally renormalise them.

    Softmax keeps the logits' order, so the top k of the logits are the experts chosen; and
    the top k's probabilities renormalised are the softmax of the top k's logits: two ops
    (top-k, a softmax over k) where the formula takes five and a cast. The weights are
    transformers' within a rounding (bf16: about one weight in 10^4 a unit in the last
    place apart). The experts are transformers' wherever the softmax keeps the logits
    apart: always for bf16 and fp16 logits; float32 logits an ulp or so apart can round to
    one probability, a tie transformers breaks by index and this by logit."""

    def route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if normalize:
            top, ids = torch.topk(logits, top_k, dim=-1)
            return ids, torch.softmax(top, dim=-1, dtype=torch.float32 if keep_fp32 else None)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, top_k, dim=-1)
        return ids, (w if keep_fp32 else w.to(logits.dtype))

    def paired(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits [T, 2, E]``: a layer's and the next MoE layer's (``CausalLM.pair_routers``)
        -> both layers' ``ids [T, 2, k]`` and this layer's weights, in the ops of one layer's
        routing (the same bits: every op works along the experts). Not ``route`` on both:
        the weights are taken from this layer's row before they are made, so that they come
        out contiguous (a strided ``[T, k]`` costs a copy where the experts flatten it)."""
        if normalize:
            top, ids = torch.topk(logits, top_k, dim=-1)
            return ids, torch.softmax(top[:, 0], dim=-1, dtype=torch.float32 if keep_fp32 else None)
        w, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), top_k, dim=-1)
        return ids, (w[:, 0] if keep_fp32 else w[:, 0].to(logits.dtype))

    route.softmax_topk = (top_k, normalize)  # what the CPU kernels' one-call routing takes (kernels/modules.py)
    route.select = lambda logits: torch.topk(logits, top_k, dim=-1).indices  # the choice alone: one op
    route.paired = paired
    return route


class DecoderLayer(nn.Module):
    """Pre-norm residual block. ``mlp_name`` is the checkpoint's name for the MLP/MoE
    module (``block_sparse_moe`` in Mixtral and Phi-MoE files, ``mlp`` elsewhere)."""

    def __init__(
        self,
        attn: nn.Module,
        mlp: nn.Module,
        norm: Callable[[], nn.Module],
        mlp_name: str = "mlp",
        attn_name: str = "self_attn",
    ):
        super().__init__()
        self.attn_name = attn_name  # ``linear_attn`` for Qwen3-Next's linear-attention layers
        setattr(self, attn_name, attn)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)

    @property
    def attn(self) -> nn.Module:
        return getattr(self, self.attn_name)

    @property
    def ffn(self) -> nn.Module:
        """The layer's MLP (dense, or the MoE block), under the checkpoint's name. Called as
        a module, so that a dense MLP's cost hooks fire (the mock left the first dense
        layers of DeepSeek-V3, Kimi-K2 and GLM-4.x unpriced when the layer called its
        ``forward``)."""
        return getattr(self, self.mlp_name)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, rope: tuple) -> torch.Tensor:
        if x.shape[0] <= PREFILL_PART:  # (decoding: no call more a layer)
            x = x + self.attn(self.input_layernorm(x), layer, cache, rope)
            return x + self.ffn(self.post_attention_layernorm(x))
        x = x + attention_in_parts(self.attn, self.input_layernorm(x), layer, cache, rope)
        h, ffn = self.post_attention_layernorm(x), self.ffn
        # a MoE block takes the whole pass (its shared experts go in parts), a dense MLP parts
        return x + (ffn(h) if isinstance(ffn, SparseMoE) else rows_in_parts(ffn, h))


class Backbone(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: list[nn.Module], norm: nn.Module):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class CausalLM(nn.Module):
    """The common top level: ``model.{embed_tokens,layers,norm}`` and ``lm_head``, as in
    Hugging Face checkpoints, so ``load_state_dict`` takes their names unchanged.

    Subclasses (one per family) build the layers and set ``config`` (a family dataclass
    with ``moe_layers``, ``num_experts``, ``top_k``) and ``rotary``.
    """

    config: object
    rotary: Rotary

    def __init__(self, backbone: Backbone, vocab: int, hidden: int, head_bias: bool = False):
        super().__init__()
        self.model = backbone
        self.lm_head = nn.Linear(hidden, vocab, bias=head_bias)
        self.moe_blocks: dict[int, SparseMoE] = {}
        for i, layer in enumerate(backbone.layers):
            mlp = layer.ffn
            if isinstance(mlp, SparseMoE):
                mlp.layer = i
                self.moe_blocks[i] = mlp

    def set_experts(self, executor: ExpertExecutor) -> None:
        for block in self.moe_blocks.values():
            block.experts = executor

    @functools.cached_property
    def rope_switches(self) -> tuple[int, ...]:
        """The sequence lengths past which a pass rotates with other tables (LongRoPE's
        original training length); () for most models. Read once, at the first pass."""
        rotaries = getattr(self, "rotaries", None)
        found = {r.switch for r in (rotaries.values() if rotaries else [self.rotary])}
        return tuple(sorted(found - {None}))

    def rope_regime(self, end: int) -> int:
        """Which rotary tables a pass ending at ``end`` takes: the switches it passes."""
        return sum(end > s for s in self.rope_switches)

    def recomputes(self, cache: KVCache, T: int) -> bool:
        """Whether a pass of ``T`` tokens continuing ``cache`` recomputes it: it takes other
        rotary tables than the positions cached (``__call__``)."""
        n = cache.length
        return bool(self.rope_switches) and n > 0 and self.rope_regime(n + T) != cache.regime

    def __call__(self, input_ids: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """``forward``, after recomputing the cache where this pass takes other rotary
        tables than the positions cached (a LongRoPE sequence growing past its original
        length, or cut back below it): every position is then rotated as the reference
        rotates them, whose ``generate`` drops the cache at that point and re-encodes the
        whole sequence. So a token's logits depend on the sequence so far, never on the
        context a run planned for."""
        if not self.rope_switches or input_ids.device.type == "meta":  # (meta: the planner's op counts)
            return super().__call__(input_ids, cache, last_only)
        start = cache.length
        ids = input_ids.tolist()
        redo = self.recomputes(cache, input_ids.shape[0])
        if redo:
            ids = cache.ids[:start] + ids
            input_ids = torch.tensor(ids, dtype=input_ids.dtype)
            cache.clear()
        cache.regime = self.rope_regime(cache.length + len(ids))  # (after a recompute: from 0)
        del cache.ids[cache.length :]
        cache.ids.extend(ids)
        logits = super().__call__(input_ids, cache, last_only)
        return logits[start:] if redo and not last_only else logits

    def rope_span(self, cache: KVCache) -> int | None:
        """The most positions a pass continuing ``cache`` may take and still give each
        position the logits that decoding it alone would (None: any): up to the next
        LongRoPE switch; 1 where the next pass recomputes the cache (speculative decoding
        leaves that pass to the target)."""
        switches, n = self.rope_switches, cache.length
        if not switches:
            return None
        if self.recomputes(cache, 1):
            return 1
        ahead = [s for s in switches if s >= n + 1]
        return min(ahead) - n if ahead else None

    def pair_routers(self) -> bool:
        """Gate-prefetch's guess from the layer's own router product: every MoE router's
        weight becomes a view of one buffer, in layer order, so that a layer's and the next
        MoE layer's are one ``[2E, H]`` matrix (``SparseMoE.pair``): one product and one top-k
        route the layer and guess the next, the ops of the layer's routing alone, where a
        router of its own would add a product, a top-k and a join per layer (on a GPU,
        launches). Done where every router is a bias-free linear of one size whose rule
        can route a pair (``softmax_topk``); whether it was. Nothing is held twice. Every
        policy routes from the pair (a GEMM's columns may round differently with its
        width), so a layer's router reads the next one's rows too: E x H weights more a
        layer (Qwen3-30B-A3B: 24 MiB a token)."""
        if not self.pairable_routers():
            return False
        blocks = [self.moe_blocks[i] for i in sorted(self.moe_blocks)]
        E = blocks[0].gate.out_features
        joined = rows_joined([b.gate.weight for b in blocks])
        for i, b in enumerate(blocks):
            b.gate.weight = nn.Parameter(joined[i * E : (i + 1) * E], requires_grad=False)
            b.pair = joined[i * E : (i + 2) * E] if i + 1 < len(blocks) else None
        return True

    def pairable_routers(self) -> bool:
        """Whether ``pair_routers`` can pair this model's routers: two MoE layers or more,
        each router a bias-free linear of one size whose rule routes a pair."""
        blocks = list(self.moe_blocks.values())
        shape = blocks[0].gate.weight.shape if blocks else None
        return len(blocks) > 1 and all(
            type(b.gate) is nn.Linear  # not an Fp32Router
            and b.gate.bias is None
            and b.gate.weight.shape == shape
            and hasattr(b.route, "paired")
            and type(b).router_logits is SparseMoE.router_logits
            for b in blocks
        )

    def set_router_observer(self, observer: Callable | None) -> None:
        for block in self.moe_blocks.values():
            block.observer = observer

    context = 0  # the context the model was loaded for (build_model): the KV cache's cap

    def new_cache(self) -> KVCache:
        return KVCache(len(self.model.layers), self.context or None, self.windows())

    def windows(self) -> dict[int, int]:
        """The sliding-window layers' windows, by layer: those whose bound on what they hold
        (``2 * window_keep``) is below the context the model was loaded for (a window as
        long as the context, as some configs give, drops nothing)."""
        return {
            i: layer.attn.s.window
            for i, layer in enumerate(self.model.layers)
            if isinstance(layer.attn, Attention)
            and layer.attn.s.window
            and not (self.context and window_bound(layer.attn.s.window, None) >= self.context)
        }

    def rope_tables(self, start: int, end: int, device: torch.device, dtype: torch.dtype) -> tuple:
        return self.rotary.tables(start, end, device, dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(to_device(input_ids, self.lm_head.weight.device))  # [T, hidden]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """input_ids [T] continuing ``cache``; returns logits [T, vocab] (or [1, vocab])."""
        x = self.embed(input_ids)
        rope = self.rope_tables(cache.length, cache.length + input_ids.shape[0], x.device, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, i, cache, rope)
        cache.length += input_ids.shape[0]
        if last_only:
            x = x[-1:]
        return self.logits(x)
