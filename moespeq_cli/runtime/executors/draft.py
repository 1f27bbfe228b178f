"""The self-draft's routed experts: 4-bit copies of the target's experts (quant/draft.py),
computed where they live -- on the device, or in host memory on the CPU (issued first, so
the device computes its own experts meanwhile). Everything else the draft runs is the
target's own module, shared."""

from __future__ import annotations

import torch

from moespeq_cli.quant.draft import QuantizedExperts
from moespeq_cli.runtime.backends.base import Backend
from moespeq_cli.runtime.executors.experts import grouped, token_groups
from moespeq_cli.runtime.planning.costs import expert_cost


class DraftExperts:
    """The draft's routed experts: 4-bit weights, on the device (``on_device``; default
    all) or in host memory, where the CPU computes them (issued first, so the GPU runs the
    device-resident ones meanwhile)."""

    def __init__(
        self,
        quant: QuantizedExperts,
        backend: Backend | None,
        on_device: set | None = None,
        act_elem: int = 2,
        device_type: str = "cpu",
    ):
        """``device_type``: what the (real or simulated) device is ("cuda", "cpu"): which
        kernel its experts run on, and so what they cost (``cost``)."""
        self.quant, self.backend, self.on_device, self.act_elem = quant, backend, on_device, act_elem
        self.device_type = device_type
        if not quant.kernel_ready():  # moespeq's kernel reads the layout as stored
            quant.pack_cpu()  # the experts the CPU computes: onto bitsandbytes' packed kernel, once

    def cost(self, layer: int, e: int, tokens: int, device_type: str):
        """One expert over ``tokens`` tokens, priced as the kernel the code runs for it there."""
        path = self.quant.path((layer, e), device_type)
        q = self.quant
        return expert_cost(q.hidden, q.inter, tokens, q.bytes_per_weight(path), f"draft:{path}")

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, rows, ahead=None):
        b = self.backend
        groups = token_groups(rows)
        if b is None:
            return grouped(x, ids, weights, lambda e, xe: self.quant.forward(layer, e, xe), groups=groups)
        b.sync(1, "route")  # the routing reaches the host
        jobs = {}
        for e, (rows, _) in groups.items():
            if self.on_device is not None and (layer, e) not in self.on_device:
                xe = x[rows] if x.shape[0] > 1 else x
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
