"""A layer's routed experts in a constant number of ops: grouped GEMMs over the slot block.

On a GPU a decode step's experts are tiny kernels (an expert of Qwen3-30B-A3B is 9 MB:
about 2 us of an H200's bandwidth) and the host's launches, 5-8 us each, set the speed.
Computing each expert apart costs about ten launches an expert: 80 a layer at top-8.
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
  The bits do not depend on which slots hold the experts or how the layer's calls are
  split, so every policy gives the same result; in float32 they equal the per-expert
  path's, in bf16 the k-sum is rounded once where the per-expert path rounds each add
  (a layer that falls back to it, every slot pinned, can differ in the last bit).

About ten ops a layer for any top-k (``scripts/count_ops.py``). Every miss of the layer
is copied before the call (``ondemand`` too: it still keeps nothing). Formats whose gate,
up and down are plain matrices of the slot (SwiGLU and GELU experts, uncompressed) take
this path, and so do block-FP8 experts (DeepSeek-V3, Kimi-K2, the FP8 releases of Qwen
and GLM): the slots the layer uses, which hold the stored bytes, are gathered and
dequantized together into one bf16 block (``Fp8Slot``: two ops a matrix for all of them,
where expert by expert it was about seven a matrix and an expert), then computed as
above. gpt-oss's biased MXFP4 experts, and GPUs without a grouped GEMM kernel for the
dtype (torch's fallback reads the offsets back to the host), compute expert by expert
(``supported``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moespeq_cli.models.expert_format import FP8, GEGLU, SWIGLU, ExpertFormat, fp8_dequantize, fp8_tiles


@dataclass(frozen=True)
class Fp8Slot:
    """Where a block-FP8 expert's parts lie in a slot of bytes: each matrix's e4m3 bytes
    and its float32 scales (byte offsets, shapes), in the order gate, its scales, up, its
    scales, down, its scales."""

    starts: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    block: tuple[int, int]

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
        """Part ``j`` of every row of ``slots``, a view ``[n, *shape]`` of ``dtype``."""
        nbytes = math.prod(self.shapes[j]) * dtype.itemsize
        raw = slots[:, self.starts[j] : self.starts[j] + nbytes]
        return raw.view(dtype).view(slots.shape[0], *self.shapes[j])


@dataclass
class BatchedParts:
    """Where an expert's matrices lie in a slot: element offsets and shapes. With
    ``compact`` the slot holds block-FP8 bytes and the offsets are those of the block it
    is dequantized into (gate | up | down)."""

    gate: int
    up: int
    down: int
    inter: int
    hidden: int
    compact: Fp8Slot | None = None

    @property
    def fused(self) -> bool:  # gate then up, end to end: one [2I, H] matrix
        return self.up == self.gate + self.inter * self.hidden


def groupable(fmt: ExpertFormat) -> bool:
    """Whether experts of ``fmt`` are matrices a grouped GEMM can take (block FP8 once
    dequantized)."""
    return fmt.quant in (None, FP8) and fmt.kind in (SWIGLU, GEGLU) and not fmt.biased


def batched_parts(fmt: ExpertFormat, views, numel: int, dtype: torch.dtype) -> BatchedParts | None:
    """The offsets of gate [I, H], up [I, H] and down [H, I] in a packed slot of ``numel``
    elements, or None where the format's matrices are not plain contiguous views of it.
    Block FP8: where its parts lie in the slot's bytes, and the dequantized block's offsets."""
    if not groupable(fmt):
        return None
    flat = torch.empty(numel, dtype=dtype, device="meta")
    if fmt.quant == FP8:
        parts = views(flat)
        starts = tuple(p.storage_offset() * p.element_size() for p in parts)
        slot = Fp8Slot(starts, tuple(tuple(p.shape) for p in parts), fmt.block)
        inter, hidden = slot.shapes[0]
        return BatchedParts(0, inter * hidden, 2 * inter * hidden, inter, hidden, slot)
    try:
        gate, up, down, bias = fmt.canonical(views(flat))
    except (RuntimeError, ValueError):
        return None
    if bias is not None or not all(t.is_contiguous() and t.dtype == dtype for t in (gate, up, down)):
        return None
    inter, hidden = gate.shape
    if up.shape != (inter, hidden) or down.shape != (hidden, inter):
        return None
    return BatchedParts(gate.storage_offset(), up.storage_offset(), down.storage_offset(), inter, hidden)


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


def tiny_fp8_slot(n: int, tiles: bool, edge: int = 4) -> Fp8Slot:
    """A block-FP8 expert of hidden = intermediate = ``n`` with ``edge`` x ``edge`` scale
    blocks that tile its matrices, or one less that do not (``tiles``): what counting the
    dequantization's ops and bytes needs."""
    block = (edge, edge) if tiles else (edge - 1, edge - 1)
    grid = (-(-n // block[0]), -(-n // block[1]))
    shapes = ((n, n), grid) * 3
    sizes = [math.prod(s) * (1 if j % 2 == 0 else 4) for j, s in enumerate(shapes)]
    return Fp8Slot(tuple(sum(sizes[:j]) for j in range(6)), shapes, block)


def dequant_chunk(top_k: int) -> int:
    """The most block-FP8 slots one grouped call dequantizes at once: a decoding step's
    experts (top-k) twice over. A verification pass or a prefill that uses more experts
    makes several calls, so that the scratch memory stays what the plan reserves."""
    return 2 * top_k


def dequant_scratch_bytes(fmt: ExpertFormat, hidden: int, inter: int, top_k: int, elem: int) -> int:
    """Device memory one grouped call over block-FP8 slots takes besides the slots: the
    gathered slots (their stored bytes), the dequantized block (``elem`` a weight) and one
    matrix of each widened to float32 at a time; 0 for other formats."""
    if fmt.quant != FP8:
        return 0
    stored = fmt.nbytes(hidden, inter, torch.bfloat16)
    return dequant_chunk(top_k) * (stored + 3 * hidden * inter * elem + hidden * inter * 4)


def gathered(at: BatchedParts, block: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The slots ``cols`` of ``block`` as the grouped products take them: dequantized
    (block FP8: real work on the device) or converted to ``dtype``."""
    rows = block.index_select(0, cols)
    return at.compact.dequantize(rows, dtype) if at.compact is not None else rows.to(dtype)


def dequant_traffic(fmt: ExpertFormat, dtype: torch.dtype, tiles: bool = True) -> float:
    """Bytes of device memory traffic per weight that gathering a layer's block-FP8 slots and
    dequantizing them into ``dtype`` moves (every operand and result of those ops, counted
    on a slot of 64 x 64 matrices in 16 x 16 blocks: about 0.06 bytes of it the scales');
    0 for formats computed from their slots as they are. The grouped product then reads the
    dequantized weights again: ``dtype``'s size a weight, which the caller adds."""
    from moespeq_cli.runtime.executors.opcount import OpCounter

    if fmt.quant != FP8:
        return 0.0
    n = 64
    slot = tiny_fp8_slot(n, tiles, 16)
    at = BatchedParts(0, n * n, 2 * n * n, n, n, slot)
    block = torch.zeros(2, slot.starts[-1] + 4 * math.prod(slot.shapes[-1]), dtype=torch.uint8)
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

    n = 16
    if fmt.quant == FP8:
        slot = tiny_fp8_slot(n, tiles)
        at = BatchedParts(0, n * n, 2 * n * n, n, n, slot)
        block = torch.zeros(2, slot.starts[-1] + 4 * math.prod(slot.shapes[-1]), dtype=torch.uint8)
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
    (gate, up, down): strided views, nothing copied."""
    n, stride = block.shape[0], block.stride(0)
    i, h, base = at.inter, at.hidden, block.storage_offset()

    def part(offset: int, rows: int, cols: int) -> torch.Tensor:
        return block.as_strided((n, rows, cols), (stride, cols, 1), base + offset)

    if at.fused:
        return part(at.gate, 2 * i, h), part(at.down, h, i)
    return part(at.gate, i, h), part(at.up, i, h), part(at.down, h, i)


def grouped_mlp(
    fmt: ExpertFormat, x: torch.Tensor, parts: tuple[torch.Tensor, ...], offs: torch.Tensor
) -> torch.Tensor:
    """x [P, H], its rows slot by slot (``offs``: each slot's end row, int32) -> [P, H]:
    each slot's rows through that slot's expert, ``down(act(gate x) * up x)``."""
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
    ``max_cols``: at most that many a call (what dequantized slots may take at once)."""
    values: list[int] = []
    calls = []
    pos: dict[int, int] = {}  # expert -> its first output row
    p = 0
    step = max_cols if gather and max_cols else None
    for phase, experts in enumerate(phases):
        by_block: dict[int, list[int]] = {}
        for e in sorted(experts, key=lambda e: where[e]):
            by_block.setdefault(where[e][0], []).append(e)
        pieces = [
            (b, chosen[i : i + (step or len(chosen))])
            for b, chosen in sorted(by_block.items())
            for i in range(0, len(chosen), step or len(chosen))
        ]
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
    (s_at, n), (w_at, _) = layout.src, layout.wsrc
    w = weights.flatten().index_select(0, meta[w_at : w_at + n]).view(-1, 1)
    tokens, k = weights.shape
    return (y.to(dtype).index_select(0, meta[s_at : s_at + n]) * w).view(tokens, k, -1).sum(1).to(dtype)
