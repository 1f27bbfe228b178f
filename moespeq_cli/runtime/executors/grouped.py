"""A layer's routed experts in a constant number of ops: grouped GEMMs over the slot block.

On a GPU a decode step's experts are tiny kernels (an expert of Qwen3-30B-A3B is 9 MB:
about 2 us of an H200's bandwidth) and the host's launches, 5-8 us each, set the speed.
Computing each expert apart costs about seven launches an expert: 56 a layer at top-8.
Here every expert a layer's tokens chose that sits in the device's slots is computed at
once, whatever top-k is:

- the device's expert slots are one block ``[n_slots, numel]`` (a few after the draft
  gave memory back); each part of an expert (gate, up, down) is a strided batched view of
  the block's rows from the lowest slot the layer uses to the highest, ``[n, out, in]``,
  and gate and up, adjacent in the slot, are one view ``[n, 2I, H]``;
- the host, which already has the routing (one read a layer), lays out the (token,
  expert) pairs slot by slot and sends the layout to the device in one asynchronous copy
  (``Backend.upload``): the pairs' token rows, each slot's end offset, and where each
  token's outputs are;
- ``torch._grouped_mm`` computes slot ``s``'s rows with slot ``s``'s weights, for every
  slot in one call per projection (slots no token chose cost nothing);
- the outputs of experts computed elsewhere (the CPU, in hybrid execution) join them
  last, and each token's outputs are weighted and summed in ascending expert order.
  The bits do not depend on which slots hold the experts or how the layer's experts are
  split into calls, so every policy gives the same result (a long prompt taken a part of
  its tokens at a time, ``grouped_pairs``, may move the last bits: a slot's rows then
  reach the kernel in other blocks); in float32 they equal the per-expert
  path's, in bf16 the k-sum is rounded once where the per-expert path rounds each add
  (a layer that falls back to it, every slot pinned, can differ in the last bit).

About ten ops a layer for any top-k (``scripts/count_ops.py``). Every miss of the layer
is copied before the call (``ondemand`` too: it still keeps nothing). Formats whose gate,
up and down are plain matrices of the slot (SwiGLU and GELU experts, uncompressed) take
this path, and so do

- block-FP8 experts (DeepSeek-V3, Kimi-K2, the FP8 releases of Qwen and GLM): the slots
  the layer uses, which hold the stored bytes, are gathered and dequantized together into
  one block of the device's dtype (``Fp8Slot``: two ops a matrix for all of them, where
  expert by expert it was about seven a matrix and an expert);
- gpt-oss's experts, bf16 (used as stored, ``[in, out]``) or MXFP4 (gathered and
  dequantized together, ``Mxfp4Slot``): gate and up interleaved, and each row's two
  biases taken from its slot's, the slot found on the device from the offsets.

At most ``dequant_chunk`` compact slots are dequantized a call (the plan reserves that
scratch). GPUs without a grouped GEMM kernel for the dtype (torch's fallback reads the
offsets back to the host) compute expert by expert (``supported``); a hardware profile
records which kind its GPU is (``grouped_gemm``, written by ``moespeq calibrate``), and the
mock and the planner follow it (``profile_groups``).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from moespeq_cli.models.expert_format import (
    FP8,
    GEGLU,
    GPT_OSS,
    MXFP4,
    SWIGLU,
    ExpertFormat,
    fp8_dequantize,
    fp8_tiles,
    mxfp4_dequantize,
)
from moespeq_cli.runtime.planning.costs import dtype_name

MAX_GROUPS = 1023  # CUDA's _grouped_mm takes fewer than 1024 groups a call (GroupMM.cu checks it)
ALIGN = 16  # bytes: CUDA's _grouped_mm wants each matrix's start and row stride multiples of it
GROUPED_PAIRS = 2048  # (token, expert) pairs a layer's grouped calls take at once (a prompt's, in turn)
ROWS_PER_EXPERT = 128  # or this many rows an expert on average: each part reads every weight again


def slot_part(slots: torch.Tensor, start: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The part at byte ``start`` of every row of ``slots`` (uint8 ``[n, bytes]``, each row
    an expert as stored), a view ``[n, *shape]`` of ``dtype``."""
    raw = slots[:, start : start + math.prod(shape) * dtype.itemsize]
    return raw.view(dtype).view(slots.shape[0], *shape)


@dataclass(frozen=True)
class Fp8Slot:
    """Where a block-FP8 expert's parts lie in a slot of bytes: each matrix's e4m3 bytes
    and its float32 scales (byte offsets, shapes), in the order gate, its scales, up, its
    scales, down, its scales."""

    starts: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    block: tuple[int, int]

    @property
    def numel(self) -> int:
        """Elements of a slot dequantized: gate | up | down."""
        return sum(math.prod(self.shapes[j]) for j in (0, 2, 4))

    @property
    def tiles(self) -> bool:
        """Whether the scale blocks tile every matrix (one way of dequantizing for all)."""
        return all(fp8_tiles(self.shapes[j], self.block) for j in (0, 2, 4))

    def dequantize(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``slots [n, bytes]`` (uint8, each row an expert as stored) -> ``[n, 3 I H]`` of
        ``dtype``: gate | up | down, each product rounded once, as expert by expert."""
        n = slots.shape[0]
        sizes = [math.prod(self.shapes[j]) for j in (0, 2, 4)]
        out = torch.empty(n, sum(sizes), dtype=dtype, device=slots.device)
        pos = 0
        for j, size in zip((0, 2, 4), sizes, strict=True):
            w = self.part(slots, j, torch.float8_e4m3fn)
            s = self.part(slots, j + 1, torch.float32)
            fp8_dequantize(w, s, self.block, dtype, out=out[:, pos : pos + size], tiles=self.tiles)
            pos += size
        return out

    def part(self, slots: torch.Tensor, j: int, dtype: torch.dtype) -> torch.Tensor:
        return slot_part(slots, self.starts[j], self.shapes[j], dtype)


@dataclass(frozen=True)
class Mxfp4Slot:
    """Where a gpt-oss MXFP4 expert's parts lie in a slot of bytes (byte offsets, shapes,
    dtypes: gate|up blocks, scales, bias, down blocks, scales, bias). Dequantized, a slot
    becomes gate|up ``[2I, H]`` (rows alternating gate, up), its bias ``[2I]``, down
    ``[H, I]`` and its bias ``[H]``, end to end (``BatchedParts`` of ``canonical``)."""

    starts: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    tiles = True  # one way of dequantizing, always (``Fp8Slot.tiles``)

    @property
    def numel(self) -> int:
        """Elements of a slot dequantized (``canonical``'s layout)."""
        (two_i, groups, _), hidden = self.shapes[0], self.shapes[3][0]
        return two_i * groups * 32 + two_i + hidden * self.shapes[3][1] * 32 + hidden

    def dequantize(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``slots [n, bytes]`` (uint8) -> ``[n, numel]`` of ``dtype``, laid out as ``canonical``."""
        n = slots.shape[0]
        gu_rows, down_rows = self.shapes[0][0], self.shapes[3][0]
        gu_n, down_n = gu_rows * self.shapes[0][1] * 32, down_rows * self.shapes[3][1] * 32
        out = torch.empty(n, self.numel, dtype=dtype, device=slots.device)
        pos = 0
        for j in (0, 3):  # each matrix, then its bias
            size = gu_n if j == 0 else down_n
            values = mxfp4_dequantize(self.part(slots, j), self.part(slots, j + 1), dtype)
            out[:, pos : pos + size].copy_(values.view(n, -1))
            pos += size
            bias = self.part(slots, j + 2)
            out[:, pos : pos + bias.shape[1]].copy_(bias)
            pos += bias.shape[1]
        return out

    def part(self, slots: torch.Tensor, j: int) -> torch.Tensor:
        return slot_part(slots, self.starts[j], self.shapes[j], self.dtypes[j])

    def canonical(self) -> BatchedParts:
        (two_i, groups, _), hidden = self.shapes[0], self.shapes[3][0]
        inter, gu = two_i // 2, two_i * groups * 32
        return BatchedParts(0, inter * hidden, gu + two_i, inter, hidden, self, (gu, gu + two_i + hidden * inter))


@dataclass
class BatchedParts:
    """Where an expert's matrices lie in a slot: element offsets and shapes. With
    ``compact`` the slot holds block-FP8 or MXFP4 bytes and the offsets are those of the
    block it is dequantized into (gate | up | down, or gpt-oss's layout). ``biases``:
    gpt-oss's (gate|up bias [2I], down bias [H]) offsets, its gate|up matrix interleaving
    gate and up rows; ``in_out``: the matrices are stored ``[in, out]`` (gpt-oss's bf16
    tensors, used as they are)."""

    gate: int
    up: int
    down: int
    inter: int
    hidden: int
    compact: Fp8Slot | Mxfp4Slot | None = None
    biases: tuple[int, int] | None = None
    in_out: bool = False

    @property
    def fused(self) -> bool:  # gate then up, end to end: one [2I, H] matrix
        return self.up == self.gate + self.inter * self.hidden


def groupable(fmt: ExpertFormat) -> bool:
    """Whether experts of ``fmt`` are matrices a grouped GEMM can take (block FP8 and
    MXFP4 once dequantized)."""
    if fmt.kind == GPT_OSS:
        return fmt.quant in (None, MXFP4)
    return fmt.quant in (None, FP8) and fmt.kind in (SWIGLU, GEGLU)


def batched_parts(fmt: ExpertFormat, views, numel: int, dtype: torch.dtype) -> BatchedParts | None:
    """The offsets of gate [I, H], up [I, H] and down [H, I] in a packed slot of ``numel``
    elements, or None where the format's matrices are not plain contiguous views of it.
    Compact formats: where their parts lie in the slot's bytes, and the offsets of the block
    they are dequantized into."""
    if not groupable(fmt):
        return None
    try:
        parts = views(torch.empty(numel, dtype=dtype, device="meta"))
    except (RuntimeError, ValueError):
        return None
    if fmt.compact:  # each part's byte offset and shape in the slot
        starts = tuple(p.storage_offset() * p.element_size() for p in parts)
        shapes = tuple(tuple(p.shape) for p in parts)
    if fmt.quant == MXFP4:
        return Mxfp4Slot(starts, shapes, tuple(p.dtype for p in parts)).canonical()
    if fmt.quant == FP8:
        slot = Fp8Slot(starts, shapes, fmt.block)
        inter, hidden = shapes[0]
        return BatchedParts(0, inter * hidden, 2 * inter * hidden, inter, hidden, slot)
    if fmt.kind == GPT_OSS:
        gu, gu_bias, down, down_bias = parts  # [H, 2I], [2I], [I, H], [H]: used as stored
        if not all(p.is_contiguous() and p.dtype == dtype for p in parts):
            return None
        hidden, two_i = gu.shape
        at = (gu.storage_offset(), down.storage_offset())
        biases = (gu_bias.storage_offset(), down_bias.storage_offset())
        return BatchedParts(at[0], at[0] + two_i // 2 * hidden, at[1], two_i // 2, hidden, None, biases, True)
    try:
        gate, up, down, bias = fmt.canonical(parts)
    except (RuntimeError, ValueError):
        return None
    if bias is not None or not all(t.is_contiguous() and t.dtype == dtype for t in (gate, up, down)):
        return None
    inter, hidden = gate.shape
    if up.shape != (inter, hidden) or down.shape != (hidden, inter):
        return None
    return BatchedParts(gate.storage_offset(), up.storage_offset(), down.storage_offset(), inter, hidden)


def aligned(at: BatchedParts, slot_numel: int, elem: int) -> bool:
    """Whether every matrix a grouped call reads from a block of slots (of ``slot_numel``
    elements each, or their dequantized block's for compact ones) starts and strides its
    rows at multiples of ``ALIGN`` bytes, as CUDA's ``_grouped_mm`` requires (torch's CPU
    kernel does not check): the starts, the slot's size and both matrix widths."""
    row = at.compact.numel if at.compact is not None else slot_numel
    return all(v * elem % ALIGN == 0 for v in (at.gate, at.up, at.down, row, at.inter, at.hidden))


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch runs ``_grouped_mm`` on ``device`` for ``dtype`` (a tiny probe).
    On CUDA only where it has a real grouped kernel (bf16 on Hopper and Blackwell): torch's
    fallback elsewhere reads the offsets back to the host (a sync) and runs a product per
    group, worse than computing expert by expert."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda" and (
        dtype != torch.bfloat16 or torch.cuda.get_device_capability(device)[0] not in (9, 10)
    ):
        return False
    try:
        a = torch.zeros(2, 16, dtype=dtype, device=device)
        b = torch.zeros(2, 16, 16, dtype=dtype, device=device)
        torch._grouped_mm(a, b.transpose(-2, -1), offs=torch.tensor([1, 2], dtype=torch.int32, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def profile_groups(hw, dtype: torch.dtype) -> bool:
    """Whether the GPU the profile ``hw`` describes computes a layer's experts in ``dtype``
    together: what ``supported`` answers there (a real grouped kernel: bfloat16 on Hopper
    and Blackwell), recorded as the profile's ``grouped_gemm``, and this torch has the op."""
    return hw.kind == "gpu" and dtype_name(dtype) in hw.grouped_gemm and hasattr(torch, "_grouped_mm")


def tiny_slot(fmt: ExpertFormat, n: int, tiles: bool = True, edge: int = 4) -> tuple[BatchedParts, torch.Tensor]:
    """(where the parts lie, a block of two zeroed slots) for an expert of ``fmt`` with
    hidden = intermediate = ``n`` (a multiple of 32 for MXFP4), block FP8 in ``edge`` x
    ``edge`` blocks that tile its matrices, or one less that do not (``tiles``): what
    counting a grouped call's ops and bytes needs."""
    from dataclasses import replace

    from moespeq_cli.models.expert_format import views_at

    if fmt.quant == FP8:
        fmt = replace(fmt, block=(edge, edge) if tiles else (edge - 1, edge - 1))
    shapes, dtypes = fmt.shapes(n, n), fmt.part_dtypes(torch.float32)
    sizes = [math.prod(s) * (d.itemsize if fmt.compact else 1) for s, d in zip(shapes, dtypes, strict=True)]
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    dtype = torch.uint8 if fmt.compact else torch.float32
    at = batched_parts(
        fmt, lambda flat: views_at(flat, starts, shapes, dtypes if fmt.compact else None), sum(sizes), dtype
    )
    assert at is not None, fmt
    return at, torch.zeros(2, sum(sizes), dtype=dtype)


def dequant_chunk(top_k: int) -> int:
    """The most compact slots one grouped call dequantizes at once: a decoding step's
    experts (top-k) twice over. A verification pass or a prefill that uses more experts
    makes several calls, so that the scratch memory stays what the plan reserves."""
    return 2 * top_k


def dequant_scratch_bytes(fmt: ExpertFormat, hidden: int, inter: int, top_k: int, elem: int) -> int:
    """Device memory one grouped call over compact slots takes besides the slots: the
    gathered slots (their stored bytes), the dequantized block (``elem`` a weight) and the
    temporaries of its largest matrix (block FP8: a float32 copy; MXFP4: its codes, as
    bytes and as int32 indices, and two arrays of values); 0 for formats computed as they
    are stored."""
    if not fmt.compact or not groupable(fmt):
        return 0
    stored = fmt.nbytes(hidden, inter, torch.bfloat16)
    widest = (2 if fmt.kind == GPT_OSS else 1) * hidden * inter  # the largest matrix, dequantized at once
    temp = widest * (4 if fmt.quant == FP8 else 5 + 2 * elem)
    block = (3 * hidden * inter + fmt.bias_numel(hidden, inter)) * elem
    return dequant_chunk(top_k) * (stored + block + temp)


def gathered(at: BatchedParts, block: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The slots ``cols`` of ``block`` as the grouped products take them: dequantized
    (compact: real work on the device) or converted to ``dtype``."""
    rows = block.index_select(0, cols)
    return at.compact.dequantize(rows, dtype) if at.compact is not None else rows.to(dtype)


def dequant_traffic(fmt: ExpertFormat, dtype: torch.dtype, tiles: bool = True) -> float:
    """Bytes of device memory traffic per weight that gathering a layer's compact slots
    (block FP8, MXFP4) and dequantizing them into ``dtype`` moves (every operand and result
    of those ops, counted on a slot of 64 x 64 matrices, FP8 in 16 x 16 blocks: about 0.06
    bytes of it the scales'); 0 for formats computed from their slots as they are. The
    grouped product then reads the dequantized weights again: ``dtype``'s size a weight,
    which the caller adds."""
    from moespeq_cli.runtime.executors.opcount import OpCounter

    if not fmt.compact or not groupable(fmt):
        return 0.0
    n = 64
    at, block = tiny_slot(fmt, n, tiles, 16)
    cols = torch.tensor([0, 1])
    with torch.inference_mode(), OpCounter(count_bytes=True) as counter:
        gathered(at, block, cols, dtype)
    return counter.bytes / (2 * 3 * n * n)


def call_ops(fmt: ExpertFormat, fused: bool, whole_layer: bool = False, tiles: bool = True) -> int:
    """The ops one grouped call dispatches (its tokens' rows gathered, the grouped
    products, the activation; block FP8: the slots gathered and dequantized, ``tiles``
    saying which way), counted on a tiny block of the same arrangement; ``whole_layer``:
    with the layout's copy to the device and the outputs' weighted sum (a layer computed
    in one call)."""
    from moespeq_cli.runtime.executors.opcount import count_ops

    n = 32
    if fmt.compact or fmt.kind == GPT_OSS:
        at, block = tiny_slot(fmt, n, tiles)
    else:
        at = BatchedParts(0, n * n, 2 * n * n, n, n) if fused else BatchedParts(0, 2 * n * n, n * n, n, n)
        block = torch.zeros(2, 3 * n * n)
    x, weights = torch.zeros(1, n), torch.ones(1, 2)
    gather = at.compact is not None
    layout = plan_layout({0: ([0], [0]), 1: ([0], [1])}, [[0, 1]], {0: (0, 0), 1: (0, 1)}, [], 1, 2, gather)
    host = torch.tensor(layout.values, dtype=torch.int32)

    def layer():
        meta = host.clone() if whole_layer else host  # the copy to the device
        outs = run_phase(fmt, at, [block], layout, meta, x, 0, lambda b, cols: gathered(at, b, cols, x.dtype))
        return combine(layout, meta, outs, weights, x.dtype) if whole_layer else outs

    return count_ops(layer)[1].ops


def views_of(block: torch.Tensor, at: BatchedParts) -> tuple[torch.Tensor, ...]:
    """``block`` [n, numel] -> (gate|up [n, 2I, H], down [n, H, I]) when fused, else
    (gate, up, down), and gpt-oss's two biases [n, 2I], [n, H] after them: strided views
    ([out, in] whatever the storage), nothing copied."""
    n, stride = block.shape[0], block.stride(0)
    i, h, base = at.inter, at.hidden, block.storage_offset()

    def part(offset: int, rows: int, cols: int) -> torch.Tensor:
        if at.in_out:  # stored [in, out]: the transposed view
            return block.as_strided((n, cols, rows), (stride, rows, 1), base + offset).transpose(-2, -1)
        return block.as_strided((n, rows, cols), (stride, cols, 1), base + offset)

    if at.biases is not None:
        return (
            part(at.gate, 2 * i, h),
            part(at.down, h, i),
            block.as_strided((n, 2 * i), (stride, 1), base + at.biases[0]),
            block.as_strided((n, h), (stride, 1), base + at.biases[1]),
        )
    if at.fused:
        return part(at.gate, 2 * i, h), part(at.down, h, i)
    return part(at.gate, i, h), part(at.up, i, h), part(at.down, h, i)


def grouped_mlp(
    fmt: ExpertFormat, x: torch.Tensor, parts: tuple[torch.Tensor, ...], offs: torch.Tensor
) -> torch.Tensor:
    """x [P, H], its rows slot by slot (``offs``: each slot's end row, int32) -> [P, H]:
    each slot's rows through that slot's expert, ``down(act(gate x) * up x)``; gpt-oss's
    biases (parts 3 and 4) added to each row from its slot's, gate and up interleaved."""
    if len(parts) == 4:  # gpt-oss: each row's slot, found on the device (no host read)
        slot = torch.searchsorted(offs, torch.arange(x.shape[0], device=x.device, dtype=offs.dtype), right=True)
        gu = torch._grouped_mm(x, parts[0].transpose(-2, -1), offs=offs) + parts[2].index_select(0, slot)
        y = torch._grouped_mm(fmt.activate(gu[:, 0::2], gu[:, 1::2]), parts[1].transpose(-2, -1), offs=offs)
        return y + parts[3].index_select(0, slot)
    if len(parts) == 2:
        gu = torch._grouped_mm(x, parts[0].transpose(-2, -1), offs=offs)
        i = parts[1].shape[2]
        gate, up = gu[:, :i], gu[:, i:]
    else:
        gate, up = (torch._grouped_mm(x, p.transpose(-2, -1), offs=offs) for p in parts[:2])
    return torch._grouped_mm(fmt.activate(gate, up), parts[-1].transpose(-2, -1), offs=offs)


@dataclass
class Layout:
    """The host's plan of a layer's grouped computation, sent to the device as one int32
    list (``values``). ``calls``: one grouped computation per (phase, block): (phase,
    block, rows at, rows n, offs at, cols at, cols n, first slot), where ``rows`` are its
    pairs' tokens slot by slot, ``offs`` each column's end row (the columns: the block's
    slots from the first used to the last, or the used ones gathered first) and ``cols``
    the slots gathered; ``src``/``wsrc`` (at, n): for each token, its k outputs and
    top-k weights in ascending expert order."""

    values: list[int]
    calls: list[tuple[int, int, int, int, int, int, int, int]]
    src: tuple[int, int]
    wsrc: tuple[int, int]


def row_span(rows: list[int], a: int, b: int) -> tuple[int, int]:
    """Where the tokens ``a`` to ``b`` lie in an expert's ascending token ``rows``:
    ``rows[lo:hi]``."""
    return bisect.bisect_left(rows, a), bisect.bisect_left(rows, b)


def rows_between(groups: dict[int, tuple[list[int], list[int]]], a: int, b: int) -> dict:
    """``groups`` (expert -> ascending token rows, their top-k slots) cut to the tokens
    ``a`` to ``b``, numbered from ``a``; experts none of them chose left out."""
    out = {}
    for e, (rows, slots) in groups.items():
        lo, hi = row_span(rows, a, b)
        if hi > lo:
            out[e] = ([r - a for r in rows[lo:hi]], slots[lo:hi])
    return out


def grouped_pairs(num_experts: int) -> int:
    """(token, expert) pairs a layer's grouped calls take at once over a prompt, its
    tokens a part at a time: ``GROUPED_PAIRS``, or ``ROWS_PER_EXPERT`` rows an expert where
    that is more (every part reads each expert's weights again, and dequantizes compact
    ones again: fewer rows an expert would make a long prompt's layer memory-bound)."""
    return max(GROUPED_PAIRS, ROWS_PER_EXPERT * num_experts)


def grouped_scratch_bytes(hw, cfg, dtype: torch.dtype, context: int) -> int:
    """Device memory a layer's grouped calls hold at once over a prompt of ``context``
    tokens, besides the pass's activations (``make_plan``'s workspace): per (token,
    expert) pair, up to ``grouped_pairs`` of them, its input row, gate|up and activation,
    output, and the weighted sum's two copies (0 where the GPU ``hw`` describes computes
    expert by expert)."""
    if not groups_on(hw, cfg, dtype):
        return 0
    h, i, elem = cfg.hidden_size, cfg.expert_intermediate, dtype.itemsize
    return min(context * cfg.top_k, grouped_pairs(cfg.num_experts)) * (4 * h + 3 * i) * elem


def groups_on(hw, cfg, dtype: torch.dtype) -> bool:
    """Whether a layer's experts are computed together on the GPU ``hw`` describes, in
    ``dtype``: it has the grouped kernel (``profile_groups``), the format's matrices are
    plain ones (``groupable``) and 16-byte aligned (``aligned``: the hidden and
    intermediate sizes in ``dtype``)."""
    h, i = cfg.hidden_size, cfg.expert_intermediate
    return profile_groups(hw, dtype) and groupable(cfg.expert_format) and shapes_aligned(h, i, dtype.itemsize)


def shapes_aligned(hidden: int, inter: int, elem: int) -> bool:
    """``aligned`` for experts of these sizes laid gate | up | down (the draft's dequantized
    block; every layout here is a sum of such matrices and biases, so where this holds
    theirs does)."""
    return aligned(BatchedParts(0, inter * hidden, 2 * inter * hidden, inter, hidden), 3 * inter * hidden, elem)


def plan_layout(
    groups: dict[int, tuple[list[int], list[int]]],
    phases: list[list[int]],
    where: dict[int, tuple[int, int]],
    host_experts: list[int],
    tokens: int,
    k: int,
    gather: bool,
    max_cols: int | None = None,
) -> Layout:
    """``groups``: expert -> (token rows, top-k slots), ascending; ``phases``: the device
    experts computed together, in turn (those ready, then those copied meanwhile);
    ``where``: device expert -> (block, slot in it); ``host_experts``: experts whose
    outputs come from elsewhere (after the device's, ascending). ``gather``: the used slots
    are gathered (and widened) first, so a call's columns are those slots, not all;
    ``max_cols``: at most that many a call (what dequantized slots may take at once). A
    call's columns never number more than ``MAX_GROUPS``: slots further apart in a block
    are computed in calls of their own."""
    values: list[int] = []
    calls = []
    pos: dict[int, int] = {}  # expert -> its first output row
    p = 0
    step = max_cols if gather and max_cols else None
    for phase, experts in enumerate(phases):
        by_block: dict[int, list[int]] = {}
        for e in sorted(experts, key=lambda e: where[e]):
            by_block.setdefault(where[e][0], []).append(e)
        pieces = []
        for b, chosen in sorted(by_block.items()):
            run: list[int] = []
            for e in chosen:
                if run:  # the call's columns with ``e``: the slots gathered, or every slot from the run's first
                    span = len(run) + 1 if gather else where[e][1] - where[run[0]][1] + 1
                    if span > MAX_GROUPS or len(run) == step:
                        pieces.append((b, run))
                        run = []
                run.append(e)
            pieces.append((b, run))
        for b, chosen in pieces:
            rows_at = len(values)
            for e in chosen:
                pos[e] = p
                values.extend(groups[e][0])
                p += len(groups[e][0])
            rows_n = len(values) - rows_at
            if gather:
                columns = [where[e][1] for e in chosen]
                counts = [len(groups[e][0]) for e in chosen]
            else:  # the block's slots from the lowest used to the highest (its rows, a view)
                count_of = {where[e][1]: len(groups[e][0]) for e in chosen}
                columns = list(range(min(count_of), max(count_of) + 1))
                counts = [count_of.get(c, 0) for c in columns]
            offs_at = len(values)
            end = 0
            for c in counts:
                end += c
                values.append(end)
            cols_at = len(values)
            if gather:
                values.extend(columns)
            calls.append((phase, b, rows_at, rows_n, offs_at, cols_at, len(columns), columns[0]))
    for e in host_experts:
        pos[e] = p
        p += len(groups[e][0])
    per_token: list[list[tuple[int, int]]] = [[] for _ in range(tokens)]
    for e, (rows, slots) in groups.items():  # ascending experts: each token's list in that order
        for i, (t, j) in enumerate(zip(rows, slots, strict=True)):
            per_token[t].append((pos[e] + i, t * k + j))
    src_at = len(values)
    values.extend(s for row in per_token for s, _ in row)
    wsrc_at = len(values)
    values.extend(w for row in per_token for _, w in row)
    return Layout(values, calls, (src_at, tokens * k), (wsrc_at, tokens * k))


def run_phase(
    fmt: ExpertFormat,
    at: BatchedParts,
    blocks: list[torch.Tensor],
    layout: Layout,
    meta: torch.Tensor,
    x: torch.Tensor,
    phase: int,
    gather,
) -> list[torch.Tensor]:
    """The outputs [rows, H] of ``phase``'s grouped calls (``meta``: ``layout.values`` on
    the device; ``gather(block, cols)``: the used slots widened to the activations' dtype,
    where the block's dtype is not theirs)."""
    outs = []
    for ph, b, rows_at, rows_n, offs_at, cols_at, cols_n, first in layout.calls:
        if ph != phase:
            continue
        block = blocks[b]
        if block.dtype != x.dtype:  # gathered first (the layout lists the used slots)
            block = gather(block, meta[cols_at : cols_at + cols_n])
        else:
            block = block[first : first + cols_n]
        xs = x.index_select(0, meta[rows_at : rows_at + rows_n])
        outs.append(grouped_mlp(fmt, xs, views_of(block, at), meta[offs_at : offs_at + cols_n]))
    return outs


def combine(layout: Layout, meta: torch.Tensor, outs: list[torch.Tensor], weights: torch.Tensor, dtype) -> torch.Tensor:
    """Each token's k outputs (``outs``: every call's, then the CPU's, in the layout's
    order) weighted by its top-k weights and summed in ascending expert order -> [T, H]."""
    y = torch.cat(outs) if len(outs) > 1 else outs[0]
    outs.clear()  # (the calls' outputs, joined: not held twice)
    (s_at, n), (w_at, _) = layout.src, layout.wsrc
    w = weights.flatten().index_select(0, meta[w_at : w_at + n]).view(-1, 1)
    tokens, k = weights.shape
    return (y.to(dtype).index_select(0, meta[s_at : s_at + n]) * w).view(tokens, k, -1).sum(1).to(dtype)
