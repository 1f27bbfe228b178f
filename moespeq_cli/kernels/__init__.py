"""Decode-shaped CPU kernels: ``linear`` and ``expert`` at the memory-bandwidth limit.

On the CPU a decoding step is a matrix-vector product over weights read from DRAM once
per token, so its speed limit is the bytes of weight it reads divided by the memory
bandwidth. torch's one-row matmul reaches about a third of that on bf16 weights; the C
kernels here (cpu_matvec.c, built once per machine by build.py) read each weight once per
block of four tokens, widen bf16/fp16 to fp32 in registers and accumulate in fp32,
split the rows over a small thread pool, and run a whole gated expert in one call. Around
them, the small work of a decoding step is one call each too (norms, rotary, routing,
greedy's choice), and where a decoder layer is built only of parts they take, the whole
layer is one call (``layer_forward``): on a small model the Python between kernels was
most of a step.

Two promises the runtime relies on:

- **Same numerics class as the reference**: fp32 activations, fp32 accumulation; bf16
  weights are used as they are (widening bf16 to fp32 is exact), so the result is the
  float32 model's up to the order of summation.
- **Batch invariance**: a row's result does not depend on how many rows are computed with
  it, so verification over k+1 tokens equals k+1 single-token steps bit for bit, and
  speculative decoding stays lossless with bf16 weights.

``available()`` says whether the fast path is on; callers fall back to torch (widening
the weights into a scratch buffer) when it is not, or for shapes it does not take
(activations other than fp32, more than ``MAX_ROWS`` rows, non-CPU tensors).
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

from moespeq_cli.kernels.build import library

WTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MAX_ROWS = 64  # beyond this (prefill) a GEMM library does better than a GEMV kernel
_pool = 0  # the pool's threads, once started
_claimed = False
_loaded: ctypes.CDLL | None = None  # the library the pool was started in


def available() -> bool:
    return _lib() is not None


def _lib() -> ctypes.CDLL | None:
    global _pool, _loaded
    if _pool:  # started: the library it runs (asked for on every kernel call)
        return _loaded
    lib = library()
    if lib is not None:
        # torch's thread count at first use (``--cpu-threads`` sets it); workers spin a little
        # between calls (MOESPEQ_KERNEL_SPIN pause iterations), then sleep
        _pool, _loaded = lib.ms_init(max(1, torch.get_num_threads()), _spin()), lib
    return lib


def _spin() -> int:
    raw = os.environ.get("MOESPEQ_KERNEL_SPIN", "")
    return int(raw) if raw.isascii() and raw.isdigit() else 20000  # ("²" is a digit to isdigit)


class held:
    """The pool's workers stay awake for the block (the caller is about to block on I/O
    and compute right after it; cpu_matvec.c ``ms_hold``). No-op without the pool."""

    def __enter__(self):
        self.on = _pool > 1
        if self.on:
            library().ms_hold(1)

    def __exit__(self, *exc):
        if self.on:
            library().ms_hold(0)


def claim_threads() -> None:
    """The kernels' pool takes the cores for decoding and torch's own parallelism steps
    down to one thread, except inside ``torch_parallel`` (a long prefill). Two pools that
    each spin between calls on the same cores slow each other down: measured on the
    2-core demo run, 113 tok/s with both pools against 420 with one."""
    global _claimed
    if _lib() is not None and _pool > 1 and not _claimed:
        _claimed = True
        torch.set_num_threads(1)


class torch_parallel:
    """torch with the pool's thread count for the block (work the kernels hand back)."""

    def __enter__(self):
        self.on = _claimed
        if self.on:
            torch.set_num_threads(_pool)

    def __exit__(self, *exc):
        if self.on:
            torch.set_num_threads(1)


def why_unavailable() -> str | None:
    from moespeq_cli.kernels import build

    return None if available() else build.why_not


def _rows(x: torch.Tensor, *ws: torch.Tensor) -> bool:
    """What every kernel needs of the activations and the weights' tensors (checked on
    every call of a decoding step: plain loops and ``is_cpu``, a few microseconds less a
    call than generators and ``device.type``)."""
    if not (x.dtype == torch.float32 and x.is_cpu and x.dim() == 2 and x.shape[0] <= MAX_ROWS):
        return False
    for w in ws:
        if not (w.is_cpu and w.is_contiguous()):
            return False
    return _lib() is not None


def takes(x: torch.Tensor, *ws: torch.Tensor) -> bool:
    """Whether the kernels compute ``x`` against weights ``ws`` (else: torch)."""
    for w in ws:
        if w.dtype not in WTYPES:
            return False
    return _rows(x, *ws)


def _product(call, x: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``y [T, n]`` from ``call(x, bias, y, T, n, K)`` (pointers and sizes) for x [T, K]."""
    x = x.contiguous()
    T, K = x.shape
    y = torch.empty(T, n, dtype=torch.float32)
    if bias is not None:
        bias = bias.float().contiguous()  # held here until the call returns
    call(x.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), T, n, K)
    return y


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [T, K] @ w[N, K].T (+ bias)`` in fp32; ``takes(x, w)`` must hold."""

    def call(xp, bp, yp, T, N, K):
        _lib().ms_linear(xp, w.data_ptr(), WTYPES[w.dtype], bp, yp, T, N, K)

    return _product(call, x, w.shape[0], bias)


ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}  # the gate's activation in ``expert``


def expert(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: str = "silu"
) -> torch.Tensor:
    """``down(act(gate x) * up x)`` for x [T, H], gate/up [I, H], down [H, I], in one
    call (``act``: a key of ACTIVATIONS); ``takes(x, gate, up, down)`` must hold and the
    three share a dtype."""
    x = x.contiguous()
    T, H = x.shape
    inter = gate.shape[0]
    scratch = torch.empty(2 * T * inter, dtype=torch.float32)
    y = torch.empty(T, H, dtype=torch.float32)
    _lib().ms_expert(
        x.data_ptr(),
        gate.data_ptr(),
        up.data_ptr(),
        down.data_ptr(),
        WTYPES[gate.dtype],
        scratch.data_ptr(),
        y.data_ptr(),
        T,
        H,
        inter,
        ACTIVATIONS[act],
    )
    return y


class ExpertTable:
    """A layer's gated experts by id for ``moe``: their weights' addresses (``parts``: per
    expert id, (gate [I, H], up [I, H], down [H, I]), every one of one dtype and contiguous;
    the tensors are held here, so the addresses stay valid). ``usable`` is False where the
    kernels cannot take them (then ``moe`` must not be called)."""

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.parts = parts
        flat = [w for ws in parts for w in ws]
        dtype = flat[0].dtype if flat else None
        self.usable = (
            bool(flat) and all(w.dtype == dtype and w.is_cpu and w.is_contiguous() for w in flat) and dtype in WTYPES
        )
        if not self.usable:
            return
        self.wt, self.inter, self.experts = WTYPES[dtype], parts[0][0].shape[0], len(parts)
        arr = ctypes.c_void_p * len(parts)
        self.gate, self.up, self.down = (arr(*(ws[j].data_ptr() for ws in parts)) for j in range(3))


def takes_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, table: ExpertTable) -> bool:
    """Whether ``moe`` computes this layer's routed experts."""
    return (
        table.usable
        and ids.dtype == torch.int64
        and weights.dtype == torch.float32
        and ids.is_cpu
        and weights.is_cpu
        and ids.dim() == 2
        and ids.shape == weights.shape
        and ids.shape[0] == x.shape[0]
        and _rows(x)
    )


def moe(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, table: ExpertTable, act: str = "silu"
) -> torch.Tensor | None:
    """``sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`` for x [T, H] in one call, bit for
    bit executors/experts.py ``grouped`` over ``expert`` (cpu_matvec.c ``ms_moe``);
    ``takes_moe`` must hold. None (nothing computed) where the routing is not a top-k the
    kernel takes: an id outside the table, or a token choosing an expert twice."""
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.contiguous()
    T, H = x.shape
    inter = table.inter
    scratch = torch.empty(2 * T * inter + 2 * T * H, dtype=torch.float32)
    y = torch.empty(T, H, dtype=torch.float32)
    status = _lib().ms_moe(
        x.data_ptr(),
        T,
        H,
        inter,
        ids.shape[1],
        table.experts,
        ids.data_ptr(),
        weights.data_ptr(),
        table.gate,
        table.up,
        table.down,
        table.wt,
        ACTIVATIONS[act],
        scratch.data_ptr(),
        y.data_ptr(),
    )
    if status == -2:
        raise MemoryError("moespeq's CPU kernels: no memory for a layer's routing")
    return y if status == 0 else None


def takes_mxfp4(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether ``linear_mxfp4`` computes ``x`` against MXFP4 ``blocks`` / ``scales``."""
    return blocks.dtype == scales.dtype == torch.uint8 and _rows(x, blocks, scales)


def linear_mxfp4(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [T, K] @ W.T (+ bias)`` for W [N, K] in MXFP4 (``blocks [N, K/32, 16]``, ``scales
    [N, K/32]``), read as stored: the dequantized weights' product, exactly, at 4.25 bits a
    weight of memory traffic. ``takes_mxfp4`` must hold."""

    def call(xp, bp, yp, T, N, K):
        _lib().ms_linear_mxfp4(xp, blocks.data_ptr(), scales.data_ptr(), bp, yp, T, N, K)

    return _product(call, x, blocks.shape[0], bias)


def takes_nf4(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, bs: int) -> bool:
    """Whether ``linear_nf4`` computes ``x`` against 4-bit ``codes`` in bitsandbytes' layout."""
    k = x.shape[-1]
    ok = codes.dtype == torch.uint8 and absmax.dtype == table.dtype == torch.float32 and table.numel() == 16
    return ok and bs % 64 == 0 and k % bs == 0 and _rows(x, codes, absmax, table)  # whole pairs of 32


def nf4_in_bf16() -> bool:
    """Whether ``linear_nf4`` rounds the weights (``table[code] * absmax``) and the
    activations to bf16 and multiplies them with AVX-512 BF16 (sums in fp32), as
    bitsandbytes' CPU kernel does; else it computes in fp32."""
    return bool(_lib().ms_nf4_bf16())


def linear_nf4(
    x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, bs: int, n: int
) -> torch.Tensor:
    """``x [T, K] @ W.T`` for W [n, K] quantized by bitsandbytes (``quantize_4bit``: NF4 or
    FP4, blocks of ``bs`` weights, not double-quantized): each weight ``table[code] *
    absmax`` (in bf16 where ``nf4_in_bf16``), read as stored at 4 + 32 / bs bits a weight,
    batch invariant. ``takes_nf4`` must hold."""

    def call(xp, bp, yp, T, N, K):
        _lib().ms_linear_nf4(xp, codes.data_ptr(), absmax.data_ptr(), table.data_ptr(), bs, bp, yp, T, N, K)

    return _product(call, x, n, None)


def takes_dequantize_4bit(
    codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, bs: int, dtype: torch.dtype
) -> bool:
    """Whether ``dequantize_4bit`` dequantizes ``codes`` to ``dtype`` (float32 or bfloat16):
    also a scale for each block of the weights, no more, no fewer (the kernel trusts it)."""
    ok = dtype in (torch.float32, torch.bfloat16) and codes.dtype == torch.uint8 and bs > 0 and bs % 2 == 0
    n, m = codes.shape
    ok = ok and (n == 1 or 2 * m % bs == 0) and absmax.numel() == -(-2 * n * m // bs)  # its rows' blocks whole
    ok = ok and absmax.dtype == table.dtype == torch.float32 and table.numel() == 16
    for t in (codes, absmax, table):
        ok = ok and t.is_cpu and t.is_contiguous()
    return ok and _lib() is not None


def dequantize_4bit(
    codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, bs: int, dtype: torch.dtype
) -> torch.Tensor:
    """``codes`` uint8 ``[n, m]`` in bitsandbytes' 4-bit layout, end to end, with an fp32
    ``absmax`` a block of ``bs`` weights -> ``[n, 2 m]`` of ``dtype``: each weight
    ``table[code] * absmax`` rounded once, at the memory's speed (the values of
    ``moespeq::dequantize_4bit``). ``takes_dequantize_4bit`` must hold."""
    n, m = codes.shape
    out = torch.empty(n, 2 * m, dtype=dtype)
    _lib().ms_dequant_4bit(
        codes.data_ptr(),
        absmax.data_ptr(),
        table.data_ptr(),
        n * 2 * m,
        bs,
        out.data_ptr(),
        int(dtype == torch.bfloat16),
    )
    return out


def takes_fp8(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> bool:
    """Whether ``linear_fp8`` computes ``x`` against block-FP8 ``w`` (blocks of whole 16-wide chunks)."""
    ok = block[1] % 16 == 0 and w.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32
    return ok and _rows(x, w, scale_inv)


def linear_fp8(
    x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [T, K] @ W.T (+ bias)`` for block-FP8 ``w [N, K]`` with ``scale_inv [ceil(N/bm),
    ceil(K/bn)]``, read as stored: the product with the dequantized weights, exactly as they
    round, at a byte a weight of memory traffic. ``takes_fp8`` must hold."""

    def call(xp, bp, yp, T, N, K):
        _lib().ms_linear_fp8(xp, w.data_ptr(), scale_inv.data_ptr(), block[0], block[1], bp, yp, T, N, K)

    return _product(call, x, w.shape[0], bias)


def expert_transposed(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """gpt-oss's expert from its parts as stored, in one call: ``x @ gate_up + bias`` (gate_up
    [H, 2I], gate and up interleaved by column), the clamped SwiGLU, ``@ down + bias`` (down
    [I, H]); the weights stream row by row, read once. ``takes(x, *parts)`` must hold and the
    four share a dtype."""
    x = x.contiguous()
    T, H = x.shape
    inter = down.shape[0]
    lib = _lib()
    scratch = torch.empty(lib.ms_expert_t_scratch(T, H, inter), dtype=torch.float32)
    y = torch.empty(T, H, dtype=torch.float32)
    lib.ms_expert_t(
        x.data_ptr(),
        gate_up.data_ptr(),
        gate_up_bias.data_ptr(),
        down.data_ptr(),
        down_bias.data_ptr(),
        WTYPES[gate_up.dtype],
        alpha,
        limit,
        scratch.data_ptr(),
        y.data_ptr(),
        T,
        H,
        inter,
    )
    return y


def per_head(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, transposed: bool = False) -> bool:
    """One product per head, each with its own weight block, in one call (``ms_heads``;
    MLA's absorbed attention): ``out[h] = x[h] @ w[h].T`` for ``w [H, N, K]``, or with
    ``transposed`` ``out[h] = x[h] @ w[h]`` for ``w [H, K, N]``, x ``[H, T, K]`` fp32. Any
    head and row strides (views into a projection's output, a weight's blocks of rows),
    the last dimension contiguous; a head's weight rows contiguous; with ``transposed``
    out's rows N apart. Batch invariant as ``linear``. Whether it did (else: torch's)."""
    H, T, K = x.shape
    N = w.shape[1] if not transposed else w.shape[2]
    if not (
        x.dtype == out.dtype == torch.float32
        and x.is_cpu
        and out.is_cpu
        and w.is_cpu
        and w.dtype in WTYPES
        and 0 < T <= MAX_ROWS
        and w.shape == ((H, K, N) if transposed else (H, N, K))
        and out.shape == (H, T, N)
        and x.stride(2) == w.stride(2) == out.stride(2) == 1
        and w.stride(1) == w.shape[2]
        and (not transposed or out.stride(1) == N)
        and min(x.stride(0), x.stride(1), w.stride(0)) >= 0
        and min(out.stride(0), out.stride(1)) > 0  # (heads or rows of the output on one another: a race)
        and _lib() is not None
    ):
        return False
    _lib().ms_heads(
        x.data_ptr(), x.stride(0), x.stride(1), w.data_ptr(), WTYPES[w.dtype], w.stride(0), int(transposed),
        out.data_ptr(), out.stride(0), out.stride(1), H, T, N, K,
    )  # fmt: skip
    return True


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's RMSNorm in float32 (``weight * (x * rsqrt(mean(x^2) + eps))``) over the last
    dimension, in one call; x and weight fp32 on the CPU."""
    x = x.contiguous()
    y = torch.empty_like(x)
    H = x.shape[-1]
    _lib().ms_rmsnorm(x.data_ptr(), weight.data_ptr(), eps, y.data_ptr(), x.numel() // H, H)
    return y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (half-split rotary), bit for bit, in one call.
    x [heads, T, d] fp32 with its last dimension contiguous; cos, sin [T, d]."""
    heads, T, d = x.shape
    if x.stride(2) != 1 or x.dtype != torch.float32 or cos.dtype != torch.float32 or _lib() is None:
        from moespeq_cli.models.rope import apply_rope

        return apply_rope(x, cos, sin)
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(heads, T, d, dtype=torch.float32)
    _lib().ms_rope(x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), heads, T, d)
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``models.base.attend`` in one call (``ms_attend``): T queries ``q [H, T, d]`` at
    positions [start, start+T) over the cached ``k [Hkv, L, d]``, ``v [Hkv, L, dv]`` ->
    ``[T, H * dv]``, each (query, head) computed alone in a fixed order, so the result
    does not depend on T (SDPA's need not be). ``sinks [H]``: gpt-oss's extra logit a
    head. None where it does not take them (not fp32 on the CPU, more than ``MAX_ROWS``
    queries: a prefill, a strided last dimension, heads not a multiple of the kv heads,
    sinks of another size, or no scratch memory): the caller's torch path then."""
    H, T, d = q.shape
    Hkv, L, dv = v.shape
    if not (
        q.dtype == k.dtype == v.dtype == torch.float32
        and q.is_cpu
        and k.is_cpu
        and v.is_cpu
        and T <= MAX_ROWS
        and k.shape[:2] == (Hkv, L)
        and k.shape[2] == d
        and H % Hkv == 0
        and q.stride(2) == k.stride(2) == v.stride(2) == 1
        and (
            sinks is None
            or (sinks.dtype == torch.float32 and sinks.is_cpu and sinks.is_contiguous() and sinks.numel() == H)
        )
        and _lib() is not None
    ):
        return None
    out = torch.empty(T, H * dv, dtype=torch.float32)
    done = _lib().ms_attend(
        q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
        v.data_ptr(), v.stride(0), v.stride(1), None if sinks is None else sinks.data_ptr(), out.data_ptr(),
        H, Hkv, T, L, d, dv, start, window or 0, scale,
    )  # fmt: skip
    return out if done else None


def _takes_rope_and_cache(
    cos: torch.Tensor, sin: torch.Tensor, kv: tuple, Hkv: int, d: int, start: int, T: int
) -> bool:
    """Whether rotary tables [T, d] and a layer's cache buffers ``kv`` ([Hkv, cap, d] each,
    the last dimension contiguous, cap >= start + T) are what the one-call kernels take:
    they write the cache by its strides, so a buffer of another shape is refused here."""
    kb, vb = kv
    return (
        cos.dtype == sin.dtype == kb.dtype == vb.dtype == torch.float32
        and cos.is_contiguous()
        and sin.is_contiguous()
        and cos.shape == (T, d)
        and kb.shape[0] == vb.shape[0] == Hkv
        and kb.shape[2] == vb.shape[2] == d
        and kb.stride(2) == vb.stride(2) == 1
        and kb.shape[1] >= start + T
        and vb.shape[1] >= start + T
    )


def attention_block(
    x: torch.Tensor,
    qkv: tuple[torch.Tensor, torch.Tensor | None],
    o: tuple[torch.Tensor, torch.Tensor | None],
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    start: int,
    heads: tuple[int, int, int],
    window: int | None,
    scale: float,
) -> torch.Tensor | None:
    """A layer's attention (models/base.py ``Attention.forward``) in one call
    (``ms_attn_block``): ``x [T, hidden]`` through the fused q/k/v weight and bias ``qkv``,
    each head's q and k RMS-normalized by ``qk_norm`` (weights [d], eps) where given, rotated
    by ``cos``/``sin [T, d]``, k and v written into the cache buffers ``kv`` ([Hkv, cap, d]
    each, cap >= start + T) at [start, start + T), attended over [0, start + T), then
    ``o``'s projection. ``heads``: (H, Hkv, d). The same kernels in the same order as the
    module's ops, so the same bits. None where it does not take them (then nothing is
    computed, though the cache rows may be written): the module's own path."""
    (wqkv, bqkv), (wo, bo), (kb, vb) = qkv, o, kv
    H, Hkv, d = heads
    T = x.shape[0]
    if not (
        _rows(x, wqkv, wo)
        and wqkv.dtype in WTYPES
        and wo.dtype in WTYPES
        and _takes_rope_and_cache(cos, sin, kv, Hkv, d, start, T)
        and wqkv.shape == ((H + 2 * Hkv) * d, x.shape[1])
        and wo.shape == (x.shape[1], H * d)
    ):
        return None
    x = x.contiguous()
    bq = None if bqkv is None else bqkv.float().contiguous()  # held until the call returns
    bo = None if bo is None else bo.float().contiguous()
    qn, kn, eps = qk_norm if qk_norm is not None else (None, None, 0.0)
    lib = _lib()
    scratch = torch.empty(lib.ms_attn_block_scratch(T, H, Hkv, d), dtype=torch.float32)
    y = torch.empty(T, x.shape[1], dtype=torch.float32)
    done = lib.ms_attn_block(
        x.data_ptr(), T, x.shape[1], wqkv.data_ptr(), WTYPES[wqkv.dtype], None if bq is None else bq.data_ptr(),
        wo.data_ptr(), WTYPES[wo.dtype], None if bo is None else bo.data_ptr(),
        None if qn is None else qn.data_ptr(), None if kn is None else kn.data_ptr(), eps,
        cos.data_ptr(), sin.data_ptr(), kb.data_ptr(), kb.stride(0), kb.stride(1), vb.data_ptr(), vb.stride(0),
        vb.stride(1), start, H, Hkv, d, window or 0, scale, scratch.data_ptr(), y.data_ptr(),
    )  # fmt: skip
    return y if done else None


MAX_ROUTED = 1024  # the most experts ``route_softmax`` ranks (cpu_matvec.c)


def route_softmax(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """models/base.py ``softmax_topk`` in one call (``ms_route_softmax``): ``ids [T, k]``
    (int64, the k most likely experts in descending order) and their probabilities
    ``[T, k]`` (float32; renormalized to sum 1 if ``normalize``). None where it does not
    take the logits (then torch's ops route): not 2-D float32 on the CPU, too many experts."""
    if not (logits.dtype == torch.float32 and logits.is_cpu and logits.dim() == 2):
        return None
    T, E = logits.shape
    if not (1 <= top_k <= E <= MAX_ROUTED) or _lib() is None:
        return None
    logits = logits.contiguous()
    ids = torch.empty(T, top_k, dtype=torch.int64)
    w = torch.empty(T, top_k, dtype=torch.float32)
    _lib().ms_route_softmax(logits.data_ptr(), T, E, top_k, int(normalize), ids.data_ptr(), w.data_ptr())
    return ids, w


class LayerDesc(ctypes.Structure):
    """A decoder layer's weights as ``ms_layer_forward`` takes them (cpu_matvec.c
    ``ms_layer``, field for field), described once: the call then passes only what
    changes. ``keep`` holds every tensor whose address is in it."""

    _fields_ = [(n, ctypes.c_long) for n in ("hidden", "H", "Hkv", "d", "window", "E", "k", "I")]
    _fields_ += [(n, ctypes.c_float) for n in ("scale", "eps1", "eps2", "qk_eps")]
    _fields_ += [(n, ctypes.c_int) for n in ("wt_qkv", "wt_o", "wt_r", "wt_e", "act", "normalize")]
    _fields_ += [(n, ctypes.c_void_p) for n in ("norm1", "norm2", "bqkv", "bo", "qn", "kn", "wqkv", "wo", "wr")]
    _fields_ += [(n, ctypes.c_void_p) for n in ("gate", "up", "down")]


def layer_desc(
    norms: tuple[tuple[torch.Tensor, float], tuple[torch.Tensor, float]],
    qkv: tuple[torch.Tensor, torch.Tensor | None],
    o: tuple[torch.Tensor, torch.Tensor | None],
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None,
    heads: tuple[int, int, int],
    window: int | None,
    scale: float,
    router: torch.Tensor,
    route: tuple[int, bool],
    table: ExpertTable,
) -> LayerDesc | None:
    """The ``LayerDesc`` of a layer: its two RMSNorms ((weight, eps) each), attention as
    ``attention_block`` takes it, the router's weight [E, hidden], the routing (top k,
    normalize) and the experts' ``table``; None where the kernels do not take them all
    (then the layer runs module by module)."""
    (n1, e1), (n2, e2) = norms
    (wqkv, bqkv), (wo, bo) = qkv, o
    H, Hkv, d = heads
    hidden = wo.shape[0]
    top_k, normalize = route
    E = router.shape[0]
    tensors = [n1, n2, wqkv, wo, router] + ([qk_norm[0], qk_norm[1]] if qk_norm else [])
    if not (
        table.usable
        and table.experts == E
        and all(t.is_cpu and t.is_contiguous() for t in tensors)
        and n1.dtype == n2.dtype == torch.float32
        and n1.shape == n2.shape == (hidden,)
        and wqkv.dtype in WTYPES
        and wo.dtype in WTYPES
        and router.dtype in WTYPES
        and wqkv.shape == ((H + 2 * Hkv) * d, hidden)
        and wo.shape == (hidden, H * d)
        and router.shape == (E, hidden)
        and (qk_norm is None or qk_norm[0].dtype == qk_norm[1].dtype == torch.float32)
        and 1 <= top_k <= E <= MAX_ROUTED
        and table.parts[0][0].shape == (table.inter, hidden)
        and _lib() is not None
    ):
        return None
    bq = None if bqkv is None else bqkv.float().contiguous()
    bo = None if bo is None else bo.float().contiguous()
    qn, kn, qk_eps = qk_norm if qk_norm is not None else (None, None, 0.0)
    desc = LayerDesc(
        hidden=hidden, H=H, Hkv=Hkv, d=d, window=window or 0, E=E, k=top_k, I=table.inter,
        scale=scale, eps1=e1, eps2=e2, qk_eps=qk_eps,
        wt_qkv=WTYPES[wqkv.dtype], wt_o=WTYPES[wo.dtype], wt_r=WTYPES[router.dtype], wt_e=table.wt,
        act=ACTIVATIONS["silu"], normalize=int(normalize),
    )  # fmt: skip
    for name, t in (("norm1", n1), ("norm2", n2), ("bqkv", bq), ("bo", bo), ("qn", qn), ("kn", kn)):
        setattr(desc, name, None if t is None else t.data_ptr())
    desc.wqkv, desc.wo, desc.wr = wqkv.data_ptr(), wo.data_ptr(), router.data_ptr()
    desc.gate, desc.up, desc.down = (ctypes.addressof(a) for a in (table.gate, table.up, table.down))
    desc.keep = (tensors, bq, bo, table)
    desc.need = {}  # rows -> the scratch floats a call takes
    return desc


_scratch = threading.local()  # a thread's layer scratch: the largest asked for yet (layers run one at a time)


def _layer_scratch(floats: int) -> torch.Tensor:
    """Scratch for one ``ms_layer_forward`` call, shared by every layer of every model the
    thread runs (one buffer, not one a layer: a 64-row pass of Mixtral's shape takes 9 MB)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < floats:
        buf = _scratch.buf = torch.empty(floats, dtype=torch.float32)
    return buf


def layer_forward(
    desc: LayerDesc, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: tuple, start: int
) -> torch.Tensor | None:
    """A decoder layer (``DecoderLayer.forward`` over ``desc``'s modules) in one call for x
    [T <= MAX_ROWS, hidden] float32 at positions [start, start + T): the same kernels in
    the same order as module by module, so the same bits. ``kv``: the layer's cache
    buffers ([Hkv, cap, d] each, cap >= start + T), written at [start, start + T). None
    where it does not take them (the cache rows may be written: the caller's module path
    writes the same values)."""
    kb, vb = kv
    T = x.shape[0]
    if not (
        x.dtype == torch.float32
        and x.is_cpu
        and x.dim() == 2
        and 1 <= T <= MAX_ROWS
        and x.shape[1] == desc.hidden
        and _takes_rope_and_cache(cos, sin, kv, desc.Hkv, desc.d, start, T)
    ):
        return None
    lib = _lib()
    need = desc.need.get(T)
    if need is None:
        need = desc.need[T] = lib.ms_layer_scratch(ctypes.byref(desc), T)
    scratch = _layer_scratch(need)
    x = x.contiguous()
    y = torch.empty(T, desc.hidden, dtype=torch.float32)
    done = lib.ms_layer_forward(
        ctypes.byref(desc), x.data_ptr(), T, cos.data_ptr(), sin.data_ptr(), kb.data_ptr(), kb.stride(0),
        kb.stride(1), vb.data_ptr(), vb.stride(0), vb.stride(1), start, scratch.data_ptr(), y.data_ptr(),
    )  # fmt: skip
    return y if done else None


def argmax(rows: torch.Tensor) -> list[int] | None:
    """Each row's first maximum, for rows [R, N] float32 on the CPU, in one call
    (``ms_argmax``), where the kernels are already in use in this process (no build for
    it); None where not, or where a logit is NaN or infinite (the caller's path refuses
    those)."""
    lib = _loaded
    if lib is None or not (rows.dtype == torch.float32 and rows.is_cpu and rows.dim() == 2 and rows.shape[1] > 0):
        return None
    rows = rows.contiguous()
    out = torch.empty(rows.shape[0], dtype=torch.int64)
    if not lib.ms_argmax(rows.data_ptr(), rows.shape[0], rows.shape[1], out.data_ptr()):
        return None
    return out.tolist()


def model_forward(
    descs: list[LayerDesc],
    embed: torch.Tensor,
    ids: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kvs: list[tuple[torch.Tensor, torch.Tensor]],
    start: int,
    norm: tuple[torch.Tensor, float],
    head: tuple[torch.Tensor, torch.Tensor | None],
    last_only: bool,
) -> torch.Tensor | None:
    """A model's whole forward pass (``CausalLM.forward`` over layers each described by
    ``descs``) in one call (``ms_model_forward``) for ids [T <= MAX_ROWS] at positions
    [start, start + T): logits [T, vocab] float32 (the last row's only if ``last_only``),
    the module path's bit for bit. ``embed``: the embedding [vocab, hidden]; ``kvs``: each
    layer's cache buffers; ``norm``: the final RMSNorm (weight, eps); ``head``: the output
    projection (weight [vocab, hidden], bias). None where it does not take them (then
    nothing is trustworthy but the cache rows, which the module path writes again)."""
    (nw, eps), (hw, hb) = norm, head
    T, n, hidden = ids.shape[0], len(descs), embed.shape[1]
    lib = _lib()
    if not (
        lib is not None
        and n >= 1
        and ids.dtype == torch.int64
        and ids.is_cpu
        and ids.dim() == 1
        and 1 <= T <= MAX_ROWS
        and embed.dtype in WTYPES
        and hw.dtype in WTYPES
        and all(t.is_cpu and t.is_contiguous() for t in (embed, nw, hw))
        and nw.dtype == torch.float32
        and nw.shape == (hidden,)
        and hw.shape == (embed.shape[0], hidden)
        and all(d.hidden == hidden for d in descs)
        and all(_takes_rope_and_cache(cos, sin, kv, d.Hkv, d.d, start, T) for d, kv in zip(descs, kvs, strict=True))
    ):
        return None
    layers = (ctypes.c_void_p * n)(*(ctypes.addressof(d) for d in descs))
    kc = (ctypes.c_void_p * n)(*(kb.data_ptr() for kb, _ in kvs))
    vc = (ctypes.c_void_p * n)(*(vb.data_ptr() for _, vb in kvs))
    kst = (ctypes.c_long * (2 * n))(*(s for kb, _ in kvs for s in kb.stride()[:2]))
    vst = (ctypes.c_long * (2 * n))(*(s for _, vb in kvs for s in vb.stride()[:2]))
    need = lib.ms_model_scratch(layers, n, T)
    scratch = _layer_scratch(need)
    hb = None if hb is None else hb.float().contiguous()  # held until the call returns
    ids = ids.contiguous()
    R, vocab = (1 if last_only else T), hw.shape[0]
    logits = torch.empty(R, vocab, dtype=torch.float32)
    done = lib.ms_model_forward(
        layers, n, embed.data_ptr(), WTYPES[embed.dtype], vocab, ids.data_ptr(), T, cos.data_ptr(), sin.data_ptr(),
        kc, kst, vc, vst, start, nw.data_ptr(), eps, hw.data_ptr(), WTYPES[hw.dtype],
        None if hb is None else hb.data_ptr(), int(last_only), scratch.data_ptr(), logits.data_ptr(),
    )  # fmt: skip
    return logits if done else None
