"""The self-draft's routed experts: 4-bit copies of the target's experts (quant/draft.py),
computed where they live -- on the device, or in host memory on the CPU (issued first, so
the device computes its own experts meanwhile). Everything else the draft runs is the
target's own module, shared.

On a GPU the draft computes a layer's device experts in one of two ways, whichever the
cost model (``draft_groups``) finds cheaper for the model's shape on the hardware
profile:

- expert by expert, each on the 4-bit kernel (``bnb.matmul_4bit``: its GEMV reads about
  0.56 bytes a weight), each paying its own launches: seven ops an expert on a GPU
  (``GPU_EXPERT_OPS``), 57 a layer at top-8;
- all at once (``grouped``, like the target's grouped path, executors/grouped.py): the
  layer's experts lie end to end in two blocks (``QuantizedExperts.stack``), the routed
  ones are gathered and dequantized together in one op (quant/dequant.py) and computed by
  one grouped GEMM per projection: a constant number of ops whatever top-k, but the
  dequantized weights are written and read again (about 5.7 bytes a weight in bf16).

Many small experts (Qwen3-30B-A3B's 128 of width 768, top-8) go the second way; few big
ones (Mixtral's 8 of width 14336, top-2) the first. The per-expert path is also the one
for experts in host RAM (the CPU computes them) and for layers not wholly on the device.
"""

from __future__ import annotations

import functools

import torch

from moespeq_cli.models.expert_format import GEGLU, SWIGLU, ExpertFormat
from moespeq_cli.quant.dequant import dequantize_4bit
from moespeq_cli.quant.draft import QuantizedExperts, path_bytes_per_weight
from moespeq_cli.runtime.backends.base import Backend
from moespeq_cli.runtime.executors.experts import grouped, rows_of, token_groups
from moespeq_cli.runtime.executors.grouped import (
    BatchedParts,
    combine,
    plan_layout,
    profile_groups,
    run_phase,
    shapes_aligned,
)
from moespeq_cli.runtime.planning.costs import Cost, dtype_name, expert_cost


class DraftExperts:
    """The draft's routed experts: 4-bit weights, on the device (``on_device``; default
    all) or in host memory, where the CPU computes them (issued first, so the GPU runs the
    device-resident ones meanwhile); ``blocks``: the layers computed in one grouped call
    (``QuantizedExperts.stack``)."""

    def __init__(
        self,
        quant: QuantizedExperts,
        backend: Backend | None,
        on_device: set | None = None,
        act_elem: int = 2,
        device_type: str = "cpu",
        blocks: dict | None = None,
        top_k: int = 1,
        act_dtype: torch.dtype | None = None,
    ):
        """``device_type``: what the (real or simulated) device is ("cuda", "cpu"): which
        kernel its experts run on, and so what they cost (``cost``); ``act_dtype``: what it
        computes in (the mock computes a bf16 GPU's work in float32)."""
        self.quant, self.backend, self.on_device, self.act_elem = quant, backend, on_device, act_elem
        self.device_type = device_type
        self.blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = blocks or {}
        self.top_k, self.act_dtype = top_k, act_dtype
        q = quant
        self.at = BatchedParts(0, q.inter * q.hidden, 2 * q.inter * q.hidden, q.inter, q.hidden)
        if not quant.kernel_ready():  # moespeq's kernel reads the layout as stored
            # the experts not stacked: onto bitsandbytes' packed kernel, once
            quant.pack_cpu({k for k in quant.q if k[0] not in self.blocks})

    def cost(self, layer: int, e: int, tokens: int, device_type: str):
        """One expert over ``tokens`` tokens, priced as the kernel the code runs for it there."""
        path = self.quant.path((layer, e), device_type)
        q = self.quant
        return expert_cost(q.hidden, q.inter, tokens, q.bytes_per_weight(path), f"draft:{path}")

    def drop(self) -> None:
        """Let go of every expert and block (the draft is released for good)."""
        self.quant.drop()
        self.blocks.clear()
        self.on_device = set()

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, rows, ahead=None):
        b = self.backend
        groups = token_groups(rows)
        if b is None:
            if layer in self.blocks:
                outs, layout, meta = self.compute_grouped(layer, x, groups, weights, lambda v: upload(v, x.device))
                return combine(layout, meta, outs, weights, x.dtype)
            return grouped(x, ids, weights, lambda e, xe: self.quant.forward(layer, e, xe), groups=groups)
        b.sync(1, "route")  # the routing reaches the host
        if layer in self.blocks:
            token = b.begin()
            outs, layout, meta = self.compute_grouped(layer, x, groups, weights, b.upload)
            q, dtype = self.quant, self.act_dtype or x.dtype
            costs = [
                grouped_draft_cost(q.hidden, q.inter, len(rows), q.blocksize, dtype) for rows, _ in groups.values()
            ]
            b.end(token, sum(costs[1:], costs[0]), f"draft experts L{layer}", layer)
            token = b.begin()
            out = combine(layout, meta, outs, weights, x.dtype)
            b.end(token, Cost(0.0, 0.0, 0), f"draft experts sum L{layer}", layer)
            return out
        jobs = {}
        for e, (rows, _) in groups.items():
            if self.on_device is not None and (layer, e) not in self.on_device:
                xe = rows_of(x, rows, b)
                cost = self.cost(layer, e, xe.shape[0], "cpu")
                act = xe.shape[0] * self.quant.hidden * self.act_elem
                jobs[e] = b.host_compute(
                    xe,
                    lambda xh, e=e: self.quant.forward(layer, e, xh),
                    cost,
                    act,
                    f"cpu draft expert L{layer}.E{e}",
                    layer,
                    e,
                )

        def run(e: int, xe: torch.Tensor) -> torch.Tensor:
            if e in jobs:
                return b.host_result(jobs[e])
            token = b.begin()
            y = self.quant.forward(layer, e, xe)
            b.end(token, self.cost(layer, e, xe.shape[0], self.device_type), f"draft expert L{layer}.E{e}", layer, e)
            return y

        order = [e for e in groups if e not in jobs] + list(jobs)
        return grouped(x, ids, weights, run, order=order, groups=groups)

    def compute_grouped(self, layer: int, x: torch.Tensor, groups, weights: torch.Tensor, upload):
        """The layer's routed experts in one grouped computation (a few over several
        tokens) -> (outputs, layout, the layout on the device), for ``combine``;
        ``upload``: the host's index list to the device."""
        codes, absmax = self.blocks[layer]
        q = self.quant
        table = q.q[(layer, next(iter(groups)))][0][1].code
        where = {e: (0, e) for e in groups}
        # at most top-k experts dequantized at once: what the plan reserves (a draft pass is one token)
        layout = plan_layout(groups, [list(groups)], where, [], x.shape[0], weights.shape[1], True, self.top_k)
        meta = upload(layout.values)

        def gather(block: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            rows, scales = block.index_select(0, cols), absmax.index_select(0, cols)
            return dequantize_4bit(rows, scales, table, q.blocksize, q.method, x.dtype)

        return run_phase(q.format, self.at, [codes], layout, meta, x, 0, gather), layout, meta


def upload(values: list[int], device: torch.device) -> torch.Tensor:
    """An index list as the device gets it without a backend: one op, as the mock's copy."""
    return torch.tensor(values, dtype=torch.int32).to(device, copy=True)


def grouped_draft_cost(hidden: int, inter: int, tokens: int, blocksize: int, dtype: torch.dtype) -> Cost:
    """An expert's work within a grouped call computing in ``dtype``: its codes gathered
    and dequantized, the result read by the grouped GEMM (``grouped:<dtype>``); the call's
    launches are counted once for all."""
    elem = grouped_bytes_per_weight(blocksize, dtype.itemsize)
    return expert_cost(hidden, inter, tokens, elem, "grouped:" + dtype_name(dtype), 0)


def grouped_bytes_per_weight(blocksize: int, act_elem: float) -> float:
    """Device memory traffic a weight of a grouped draft call moves: its codes and scale
    read and written by the gather, read by the dequantization, which writes the weight in
    the activations' dtype (``act_elem`` bytes), read again by the grouped GEMM."""
    stored = 0.5 + 4 / blocksize
    return 3 * stored + 2 * act_elem


def groupable_draft(fmt: ExpertFormat) -> bool:
    """Whether a draft of experts of ``fmt`` can be computed a layer at a time: plain gate,
    up and down matrices (SwiGLU, GeGLU) without biases."""
    return fmt.kind in (SWIGLU, GEGLU) and fmt.bias_numel(64, 64) == 0


# The ops a draft expert computed on its own dispatches on a GPU at one token: its 4-bit
# GEMVs for gate, up and down (``bnb.matmul_4bit``: one op each), the activation's two,
# and the weighting and the sum into the layer's output (executors/experts.py ``grouped``);
# and the layer's zeroed output. The CPU that stands in for the GPU on the mock dispatches
# a few more (its kernel's casts), so the choice between the two ways does not take its
# count, which would make a GPU's plan depend on the host's kernels.
GPU_EXPERT_OPS = 7
GPU_LAYER_OPS = 1


def draft_groups(
    hw, fmt: ExpertFormat, hidden: int, inter: int, top_k: int, blocksize: int, dtype: torch.dtype
) -> bool:
    """Whether the draft computes a layer's device experts in one grouped call (module
    docstring): the GPU has a grouped GEMM kernel for ``dtype`` (``profile_groups``), the
    experts are plain matrices of whole quantization blocks, and a decoding step's
    ``top_k`` experts cost less so than one by one on the 4-bit kernel: the work by the
    profile's curves or roofline, each op a launch (one by one: ``GPU_EXPERT_OPS`` an
    expert; grouped: the call's ops counted on a tiny layer, ``draft_layer_ops``)."""
    if not (profile_groups(hw, dtype) and groupable_draft(fmt) and hidden * inter % blocksize == 0):
        return False
    if not shapes_aligned(hidden, inter, dtype.itemsize):  # CUDA's grouped GEMM takes 16-byte rows only
        return False
    each = expert_cost(hidden, inter, 1, path_bytes_per_weight("cuda", blocksize), "draft:cuda", 0)
    launches = (top_k * GPU_EXPERT_OPS + GPU_LAYER_OPS) * hw.launch_overhead
    t_each = top_k * each.charged(hw, hw.host_overhead("draft expert"), ops=0) + launches
    return grouped_layer_seconds(hw, fmt, hidden, inter, top_k, blocksize, dtype) < t_each


def grouped_layer_seconds(
    hw, fmt: ExpertFormat, hidden: int, inter: int, top_k: int, blocksize: int, dtype, tokens: int = 1
) -> float:
    """A draft layer's grouped call over ``top_k`` experts of ``tokens`` tokens each, as
    the mock charges it: each expert's work (``grouped:<dtype>``), the call's regions' host
    time and its ops (counted on a tiny layer) a launch each."""
    work = grouped_draft_cost(hidden, inter, tokens, blocksize, dtype).seconds(hw, ops=0)
    host = hw.host_overhead("draft experts") + hw.host_overhead("draft experts sum")
    return top_k * work + host + draft_layer_ops(fmt, top_k, dtype) * hw.launch_overhead


def draft_scratch_bytes(hw, cfg, blocksize: int, dtype: torch.dtype) -> int:
    """Device memory the draft's grouped calls take besides its experts for a model of
    ``cfg`` (a MoEConfig), where it makes them (``draft_groups``), else 0: a decoding
    step's top-k experts' codes and scales gathered and their weights dequantized (the
    draft decodes a token a pass, and a call takes at most top-k experts; ``make_plan``
    reserves it with the draft)."""
    hidden, inter, top_k = cfg.hidden_size, cfg.expert_intermediate, cfg.top_k
    if not draft_groups(hw, cfg.expert_format, hidden, inter, top_k, blocksize, dtype):
        return 0
    elem = dtype.itemsize
    return int(top_k * 3 * hidden * inter * (0.5 + 4 / blocksize + elem))


@functools.cache
def draft_layer_ops(fmt: ExpertFormat, top_k: int, dtype: torch.dtype) -> int:
    """The ops a draft layer's grouped call dispatches at one token (the layout's copy to
    the device and the weighted sum included), counted on a tiny layer of ``top_k``
    experts of 64 x 64 weights, blocks of 64 (the count depends on neither)."""
    from moespeq_cli.quant.draft import _bnb
    from moespeq_cli.runtime.executors.opcount import count_ops

    F = _bnb()
    n = 64
    table = F.get_4bit_type("nf4", device="cpu")
    q = {
        (0, e): [
            (
                torch.zeros(n * n // 2, 1, dtype=torch.uint8),  # zeros: the count does not depend on the values
                F.QuantState(torch.ones(n * n // n), torch.Size((n, n)), table, n, "nf4", dtype),
            )
            for _ in range(3)
        ]
        for e in range(top_k)
    }
    quant = QuantizedExperts(q, "nf4", n, dtype, n, n, fmt)
    x = torch.zeros(1, n, dtype=dtype)
    ids, weights = torch.arange(top_k).view(1, -1), torch.ones(1, top_k, dtype=dtype)
    layer = DraftExperts(quant, None, act_elem=x.element_size(), blocks=quant.stack([0], x.device), top_k=top_k)
    return count_ops(layer, 0, x, ids, weights, ids.tolist())[1].ops
