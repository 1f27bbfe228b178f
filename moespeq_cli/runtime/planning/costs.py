"""Roofline costs of the operations a decode step runs, for the mock backend's clock.

An operation that does ``flops`` floating-point work and moves ``bytes`` through device
memory takes ``max(flops / peak_flops, bytes / mem_bandwidth) + kernels * launch_overhead``
(DESIGN.md §3). On the host CPU the same operation takes
``max(flops / host_flops, bytes / host_mem_bandwidth) + kernels * host_op_overhead``, and
its activations cross the link both ways (``link_latency + bytes / link_bandwidth`` each).
The same formulas price every policy: nothing here knows which policy runs.
docs/mock-backend.md lists what is and is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moespeq_cli.runtime.planning.hardware import HardwareProfile


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float
    kernels: int = 1

    def seconds(self, hw: HardwareProfile) -> float:
        return max(self.flops / hw.peak_flops, self.bytes / hw.mem_bandwidth) + self.kernels * hw.launch_overhead

    def host_seconds(self, hw: HardwareProfile) -> float:
        """The same work on the host CPU, reading the weights from host memory."""
        return max(self.flops / hw.host_flops, self.bytes / hw.host_mem_bandwidth) + self.kernels * hw.host_op_overhead

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.kernels + other.kernels)


def linear_cost(weight_numel: int, in_f: int, out_f: int, tokens: int, elem: int) -> Cost:
    return Cost(2.0 * tokens * weight_numel, weight_numel * elem + tokens * (in_f + out_f) * elem)


def module_cost(module: nn.Module, tokens: int, elem: int, extra_kernels: int = 0) -> Cost:
    """Sum over the module's Linear layers, plus ``extra_kernels`` small kernels (norms,
    activations, rotary) that cost a launch each."""
    total = Cost(0.0, 0.0, extra_kernels)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total = total + linear_cost(m.weight.numel(), m.in_features, m.out_features, tokens, elem)
    return total


def attention_core_cost(heads: int, kv_heads: int, dk: int, dv: int, tokens: int, context: int, elem: int) -> Cost:
    """Scores and weighted sum over ``context`` cached positions, reading the KV cache once."""
    flops = 2.0 * tokens * context * heads * (dk + dv)
    kv_bytes = context * kv_heads * (dk + dv) * elem
    return Cost(flops, kv_bytes + tokens * heads * (dk + dv) * elem, 2)


def expert_cost(hidden: int, inter: int, tokens: int, elem: float) -> Cost:
    """One routed expert over ``tokens`` tokens: three matmuls, its weights read once."""
    params = 3 * hidden * inter
    return Cost(2.0 * tokens * params, params * elem + tokens * (2 * hidden + 3 * inter) * elem, 4)


def elem_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def transfer_seconds(nbytes: float, hw: HardwareProfile) -> float:
    """One copy over the host-device link (either direction)."""
    return hw.link_latency + nbytes / hw.link_bandwidth


def host_expert_seconds(cost: Cost, act_bytes: float, hw: HardwareProfile) -> float:
    """An expert computed on the CPU: activations down, compute, results back up."""
    return 2 * transfer_seconds(act_bytes, hw) + cost.host_seconds(hw)
