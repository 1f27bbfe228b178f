"""What the operations of a decode step cost, for the mock backend's clock and ``plan``.

A *region* of the code (an attention block, a router, one expert, ...) is a sequence of
kernels. Its time on a device is

    sum over its parts of work(part)  +  max(0, ops - ops the curves cover) * launch_overhead

- ``work(part)``: where the hardware profile has a measured curve for the kernel the code
  runs for that part (``moespeq calibrate``: seconds by batch size at two weight sizes,
  e.g. ``expert:bfloat16:float32``, the expert as the executor computes it), the curve at
  this part's tokens and weight bytes; otherwise the roofline ``max(flops / peak_flops,
  bytes / mem_bandwidth)`` (docs/design.md §3). Each part is priced on its own: sequential
  kernels do not share one roofline.
- ``ops``: the aten operations the region really dispatched (counted live on the mock,
  executors/opcount.py), or, where nothing counts them (``plan``), the part's estimate.
  Each costs a launch (a kernel on a GPU, framework dispatch on a CPU) beyond those a
  curve already measured.

On the host CPU (hybrid execution) the same work uses the host figures and the host
curves. Activations cross the link both ways (``link_latency + bytes / link_bandwidth``
each). The same formulas price every policy: nothing here knows which policy runs.
docs/mock-backend.md lists what is and is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from moespeq_cli.runtime.planning.hardware import HardwareProfile


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float
    kernels: int = 1  # ops it launches (an estimate; the mock counts the real ones)
    kernel: str | None = None  # the kernel the code runs for it, as profiles name curves
    tokens: int = 1
    weight_bytes: float = 0.0  # the weights it streams: what a curve scales by
    parts: tuple = ()  # a sum of sequential kernels, each priced on its own

    def _parts(self) -> tuple:
        return self.parts or (self,)

    def _work(self, hw: HardwareProfile, host: bool, busy: bool = False) -> tuple[float, int]:
        """(seconds of work, ops the curves that priced it already include); ``busy``: the
        disk is reading meanwhile (curves measured so, where the profile has them)."""
        seconds, covered = 0.0, 0
        for p in self._parts():
            curve = hw.curve(p.kernel, host, busy) if p.kernel else None
            if curve is not None:
                seconds += curve.seconds(p.tokens, p.weight_bytes)
                covered += curve.ops
            elif host:
                seconds += max(p.flops / hw.host_flops, p.bytes / hw.host_mem_bandwidth)
            else:
                seconds += max(p.flops / hw.peak_flops, p.bytes / hw.mem_bandwidth)
        return seconds, covered

    @property
    def ops(self) -> int:
        return sum(p.kernels for p in self._parts())

    def busy_priced(self, hw: HardwareProfile) -> bool:
        """Whether a curve measured while the disk was reading prices it (``@busy``) and, in
        a profile calibrated before ``read_cpu_overhead`` was, holds the CPU time of the
        reads that started during its calls (later ones leave it out)."""
        return hw.read_cpu_overhead is None and any(
            p.kernel and f"{p.kernel}@busy" in hw.kernels for p in self._parts()
        )

    def seconds(self, hw: HardwareProfile, ops: int | None = None, busy: bool = False) -> float:
        """On the device; ``ops``: the ops the region really dispatched (else the estimate);
        ``busy``: reads run meanwhile."""
        work, covered = self._work(hw, host=False, busy=busy)

        return work + max(0, (self.ops if ops is None else ops) - covered) * hw.launch_overhead

    def charged(self, hw: HardwareProfile, extra: float, ops: int | None = None, busy: bool = False) -> float:
        """``seconds`` plus ``extra``, a region's measured host time beyond its ops (below
        them where negative: ``HardwareProfile.host_overhead``), never below the work
        without ops."""
        return max(self.seconds(hw, ops, busy) + extra, self.seconds(hw, ops=0, busy=busy))

    def host_seconds(self, hw: HardwareProfile, ops: int | None = None, bandwidth: float | None = None) -> float:
        """The same work on the host CPU, reading the weights from host memory (at
        ``bandwidth`` when copies share it)."""
        if bandwidth is not None and bandwidth < hw.host_mem_bandwidth:
            hw = replace(hw, host_mem_bandwidth=bandwidth)
        work, covered = self._work(hw, host=True)
        return work + max(0, (self.ops if ops is None else ops) - covered) * hw.host_op_overhead

    def __add__(self, other: Cost) -> Cost:
        parts = self._parts() + other._parts()
        return Cost(
            sum(p.flops for p in parts),
            sum(p.bytes for p in parts),
            sum(p.kernels for p in parts),
            parts=parts,
        )


def linear_cost(
    weight_numel: int, in_f: int, out_f: int, tokens: int, elem: int, weight_elem: int | None = None
) -> Cost:
    """One linear layer over ``tokens`` rows: activations of ``elem`` bytes, weights of
    ``weight_elem`` (default the same). Its kernel is ``linear:<dtype>``, or
    ``linear:<weights>:<activations>`` where they differ (the CPU kernels' bf16 weights
    against float32 activations)."""
    w_elem = weight_elem or elem
    kernel = f"linear:{ELEM_DTYPES.get(w_elem, 'float32')}"
    if w_elem != elem:
        kernel += f":{ELEM_DTYPES.get(elem, 'float32')}"
    return Cost(
        2.0 * tokens * weight_numel,
        weight_numel * w_elem + tokens * (in_f + out_f) * elem,
        1,
        kernel,
        tokens,
        weight_numel * w_elem,
    )


def module_cost(
    module: nn.Module,
    tokens: int,
    elem: int,
    extra_kernels: int = 0,
    weight_elem: int | None = None,
    rows: dict[int, int] | None = None,
) -> Cost:
    """Its Linear layers, each a kernel of its own, plus ``extra_kernels`` small ones
    (norms, activations, rotary) that cost a launch each. An attention whose q, k and v
    run as one product (``fuse_qkv``: the device tier, the CPU kernels) is priced as that
    one product, as it runs: one call of the fused weight, where three calls would each
    pay a small product's fixed time on a measured curve. ``rows``: the rows a Linear
    (by ``id``) multiplies where they are not ``tokens`` (MLA's expansion of the cache)."""
    rows = rows or {}
    total = Cost(0.0, 0.0, extra_kernels)
    fused = getattr(module, "fused_qkv", None)
    skip: set[int] = set()
    if fused is not None:
        w = fused[1]
        total = total + linear_cost(w.numel(), w.shape[1], w.shape[0], tokens, elem, weight_elem)
        skip = {id(module.q_proj), id(module.k_proj), id(module.v_proj)}
    for m in module.modules():
        if isinstance(m, nn.Linear) and id(m) not in skip:
            t = rows.get(id(m), tokens)
            total = total + linear_cost(m.weight.numel(), m.in_features, m.out_features, t, elem, weight_elem)
    return total


def attention_core_cost(heads: int, kv_heads: int, dk: int, dv: int, tokens: int, context: int, elem: int) -> Cost:
    """Scores and weighted sum over ``context`` cached positions, reading the KV cache once."""
    flops = 2.0 * tokens * context * heads * (dk + dv)
    kv_bytes = context * kv_heads * (dk + dv) * elem
    return Cost(flops, kv_bytes + tokens * heads * (dk + dv) * elem, 2)


def expert_cost(hidden: int, inter: int, tokens: int, elem: float, kernel: str | None = None, ops: int = 5) -> Cost:
    """One routed expert over ``tokens`` tokens: three matmuls, its weights read once
    (``elem`` bytes a weight); ``kernel``: the code path that runs it (a curve's name);
    ``ops``: what it dispatches (three linears, the activation and the product)."""
    params = 3 * hidden * inter
    return Cost(
        2.0 * tokens * params,
        params * elem + tokens * (2 * hidden + 3 * inter) * 2,
        ops,
        kernel,
        tokens,
        params * elem,
    )


ELEM_DTYPES = {4: "float32", 2: "bfloat16"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def expert_kernel(fmt, weights: torch.dtype, activations: torch.dtype) -> str:
    """The curve name of the kernel an expert of ``fmt`` runs: ``expert:<weights>:<activations>``
    for the SwiGLU and GELU experts, with the layout before it for the others
    (``expert:gpt_oss:...``, ``expert:gpt_oss-mxfp4:...``, ``expert:fp8:...``)."""
    from moespeq_cli.models.expert_format import GPT_OSS, SWIGLU

    if fmt.compact:
        tag = f"{fmt.quant}:" if fmt.kind == SWIGLU else f"{fmt.kind}-{fmt.quant}:"
    else:
        tag = f"{GPT_OSS}:" if fmt.kind == GPT_OSS else ""
    return f"expert:{tag}{dtype_name(weights)}:{dtype_name(activations)}"


def elem_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def transfer_seconds(nbytes: float, hw: HardwareProfile) -> float:
    """One copy over the host-device link (either direction)."""
    return hw.link_latency + nbytes / hw.link_bandwidth


def device_expert_seconds(cost: Cost, hw: HardwareProfile, grouped: bool) -> float:
    """An expert computed on the device, as the mock charges it: within a layer's grouped
    call its work only (the call's launches and host time are the layer's), else its own
    launches and the host time the profile measured for an expert region."""
    if grouped:
        return cost.seconds(hw, ops=0)
    return cost.charged(hw, hw.host_overhead("expert"))


def host_expert_seconds(cost: Cost, act_bytes: float, hw: HardwareProfile) -> float:
    """An expert computed on the CPU: activations down, compute, results back up."""
    return 2 * transfer_seconds(act_bytes, hw) + cost.host_seconds(hw)
