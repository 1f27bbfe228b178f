"""Routed-expert compute: the grouping every executor shares, and the in-memory executor.

``grouped(x, ids, weights, run, groups)`` computes ``sum_j weights[t, j] * expert_ids[t, j](x[t])``
by visiting each expert used by any of the T tokens once, in ascending id order, and
running it on all of its tokens in one matmul (the same order and dtypes as the
Hugging Face reference, so bf16 results agree). ``run(e, x_e)`` returns the expert's
output for its tokens; executors differ only in where they get the weights.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moespeq_cli import kernels
from moespeq_cli.models import base as model_base
from moespeq_cli.models.base import GATE_ACTIVATIONS, rows_in_parts
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.models.expert_format import FP8, GEGLU, GPT_OSS, MXFP4, SWIGLU, ExpertFormat


def expert_mlp(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, fast: bool = False, act: str = "silu"
) -> torch.Tensor:
    """x [n, H]; gate, up [I, H]; down [H, I] -> [n, H]: ``down(act(gate x) * up x)``.

    ``fast``: where the expert really runs on this CPU (the cpu backend, CPU experts
    beside a GPU), moespeq's decode kernel computes it in one call from the weights as
    they are (bf16 stays bf16) with fp32 activations and accumulation (kernels/). The
    mock keeps torch's ops, whose count it prices as a GPU's launches. Otherwise weights
    held in another dtype than the activations are widened for the product, into a
    scratch buffer kept for the thread: the same values as widening them at load,
    without allocating (and page-faulting) 3 x I x H floats per expert."""
    if fast:
        from moespeq_cli import kernels

        if x.dtype != torch.float32 and x.device.type == "cpu":  # bf16 activations (cuda's host experts)
            return expert_mlp(x.float(), gate, up, down, fast, act).to(x.dtype)
        if gate.dtype == up.dtype == down.dtype and kernels.takes(x, gate, up, down):
            return kernels.expert(x, gate, up, down, act)
        with kernels.torch_parallel():  # a prefill's many rows: torch's GEMM
            return expert_mlp(x, gate, up, down, act=act)
    if gate.dtype != x.dtype:
        gate, up, down = widened(x.dtype, x.device, gate, up, down)
    return F.linear(GATE_ACTIVATIONS[act](F.linear(x, gate)) * F.linear(x, up), down)


def expert_forward(fmt: ExpertFormat, x: torch.Tensor, parts, fast: bool = False) -> torch.Tensor:
    """x [n, H] -> [n, H] through an expert held as ``parts`` of format ``fmt``
    (models/expert_format.py). Where ``fast`` (the expert really runs on this CPU), the
    kernels compute every format from its parts as stored: gated experts by ``ms_expert``
    (Gemma 4's halves are views), gpt-oss's transposed, biased ones by ``ms_expert_t``;
    otherwise, and for shapes the kernels do not take, torch computes them in the family's
    order of operations, the weights widened to the activations' dtype. A prompt's many
    rows go ``PREFILL_PART`` at a time (models/base.py): an expert's intermediate
    activations are a part's, however many of the prompt's tokens chose it."""
    if x.shape[0] > model_base.PREFILL_PART:
        return rows_in_parts(lambda rows: expert_forward(fmt, rows, parts, fast), x)
    if fmt.kind == SWIGLU and not fmt.compact:
        return expert_mlp(x, *parts, fast)
    if fmt.compact:
        if not fast:  # dequantized for the call (models/expert_format.py)
            return fmt.forward(x, parts)
        from moespeq_cli import kernels

        xf = x.float()
        if fmt.quant == MXFP4 and kernels.takes_mxfp4(xf, parts[0], parts[1]):
            gu_b, gu_s, gu_bias, d_b, d_s, d_bias = parts  # read as stored: gate and up rows alternate
            gu = kernels.linear_mxfp4(xf, gu_b, gu_s, gu_bias)
            y = kernels.linear_mxfp4(fmt.activate(gu[:, 0::2], gu[:, 1::2]), d_b, d_s, d_bias)
            return y.to(x.dtype)
        if fmt.quant == FP8 and all(kernels.takes_fp8(xf, parts[j], parts[j + 1], fmt.block) for j in (0, 2, 4)):
            gate, up = (kernels.linear_fp8(xf, parts[j], parts[j + 1], fmt.block) for j in (0, 2))
            return kernels.linear_fp8(fmt.activate(gate, up), parts[4], parts[5], fmt.block).to(x.dtype)
        with kernels.torch_parallel():
            return fmt.forward(xf, parts).to(x.dtype)
    if fast and fmt.kind == GEGLU:
        gate, up, down, _ = fmt.canonical(parts)
        return expert_mlp(x, gate, up, down, fast, "gelu_tanh" if fmt.approximate == "tanh" else "gelu")
    if fast and fmt.kind == GPT_OSS:
        from moespeq_cli import kernels

        if len({p.dtype for p in parts}) == 1 and kernels.takes(x, *parts):
            return kernels.expert_transposed(x, *parts, fmt.alpha, fmt.limit)
        if x.dtype != torch.float32 and x.device.type == "cpu" and kernels.takes(x.float(), *parts):
            return kernels.expert_transposed(x.float(), *parts, fmt.alpha, fmt.limit).to(x.dtype)
    if parts[0].dtype != x.dtype:
        parts = widened(x.dtype, x.device, *parts)
    from moespeq_cli import kernels

    with kernels.torch_parallel() if fast else contextlib.nullcontext():
        return fmt.forward(x, parts)


_scratch = threading.local()


def widened(dtype: torch.dtype, device: torch.device, *ws: torch.Tensor) -> list[torch.Tensor]:
    """``ws`` copied into this thread's scratch buffer of ``dtype`` (grown as needed)."""
    need = sum(w.numel() for w in ws)
    key = (dtype, device)
    buf = getattr(_scratch, "bufs", {}).get(key)
    if buf is None or buf.numel() < need:
        # a normal tensor (writable in and out of inference mode), made once for the thread:
        # not an op of whichever pass comes first (hidden from op counters, so that the
        # mock prices an engine's passes alike whatever ran before it in the process)
        with torch.inference_mode(False), torch._C._DisableTorchDispatch():
            buf = torch.empty(need, dtype=dtype, device=device)
        _scratch.__dict__.setdefault("bufs", {})[key] = buf
    out, pos = [], 0
    for w in ws:
        view = buf[pos : pos + w.numel()].view(w.shape)
        view.copy_(w)
        out.append(view)
        pos += w.numel()
    return out


def token_groups(ids: torch.Tensor | list[list[int]]) -> dict[int, tuple[list[int], list[int]]]:
    """expert -> (token rows, top-k slots), experts in ascending order; ``ids`` as a
    tensor or as its ``tolist()``."""
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for t, row in enumerate(ids.tolist() if isinstance(ids, torch.Tensor) else ids):
        for j, e in enumerate(row):
            g = groups.setdefault(e, ([], []))
            g[0].append(t)
            g[1].append(j)
    return dict(sorted(groups.items()))


def rows_of(x: torch.Tensor, rows: list[int], backend) -> torch.Tensor:
    """The rows of ``x`` an expert takes, gathered on the device by an index ``backend``
    sends there without a wait (``x[rows]`` copies a Python list from pageable memory: on
    a GPU a blocking copy that waits for the compute stream, one a CPU expert of a
    verification)."""
    return x if x.shape[0] == 1 else x.index_select(0, backend.upload(rows))


def grouped(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    run: Callable[[int, torch.Tensor], torch.Tensor],
    groups: dict[int, tuple[list[int], list[int]]],
    order: list[int] | None = None,
) -> torch.Tensor:
    """``groups``: ``token_groups`` of the routing already on the host (the block read it
    once). ``order`` is the order experts are computed in (an offloading policy computes the
    resident ones first); outputs are always summed in ascending expert order, so every
    policy gives bit-identical results. With several tokens, each expert's token rows and
    top-k slots are slices of one stable sort of ``ids`` on its device (three ops a layer,
    no per-expert copy from the host: on a GPU such a copy waits for the device)."""
    single = x.shape[0] == 1
    index, slot = {}, {}
    if not single:
        k = ids.shape[1]
        by_expert = torch.argsort(ids.flatten(), stable=True)  # experts ascending, tokens ascending within
        tok, pos = by_expert // k, by_expert % k
        start = 0
        for e, (rows, _) in groups.items():  # ascending, as the sort
            index[e], slot[e] = tok[start : start + len(rows)], pos[start : start + len(rows)]
            start += len(rows)
    outputs = {}
    for e in order if order is not None else groups:
        if single:
            outputs[e] = run(e, x) * weights[0, groups[e][1][0]]
        else:
            r = index[e]
            outputs[e] = run(e, x[r]) * weights[r, slot[e], None]
    out = torch.zeros_like(x)  # [T, H]
    for e in groups:
        y = outputs[e] if outputs[e].dtype == out.dtype else outputs[e].to(out.dtype)  # a no-op .to costs 2.5 us
        if single:
            out += y
        else:
            out.index_add_(0, index[e], y)
    return out


class InMemoryExperts:
    """Every routed expert in host memory (the ExpertStore's packed buffers): the ``cpu``
    backend and the reference the offloading runtime is checked against."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, fast: bool = False):
        """``dtype``: what the experts are held in; ``fast``: computed by the CPU kernels."""
        from moespeq_cli.runtime.tiers.store import ExpertStore

        self.store = ExpertStore(ckpt, dtype)
        self.fast = fast
        self.views: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}  # the experts never move
        self.tables: dict[int, kernels.ExpertTable | None] = {}  # layer -> its table (``table``)

    def parts(self, layer: int, expert: int) -> tuple[torch.Tensor, ...]:
        key = (layer, expert)
        if key not in self.views:
            self.views[key] = self.store.views(self.store.buffer(layer, expert))
        return self.views[key]

    def table(self, layer: int):
        """The layer's experts for the kernels' one call a layer (``kernels.moe``), or None
        where it does not apply: not ``fast``, or not plain gated experts."""
        if layer not in self.tables:
            fmt, table = self.store.config.expert_format, None
            if self.fast and fmt.kind == SWIGLU and not fmt.compact:
                n = self.store.config.num_experts
                table = kernels.ExpertTable([self.parts(layer, e) for e in range(n)])
            self.tables[layer] = table
        return self.tables[layer]

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, rows, ahead=None):
        fmt, fast = self.store.config.expert_format, self.fast
        table = self.table(layer)
        if table is not None and kernels.takes_moe(x, ids, weights, table):
            out = kernels.moe(x, ids, weights, table)
            if out is not None:  # else routing it refuses: the per-expert path decides
                return out
        return grouped(
            x,
            ids,
            weights,
            lambda e, xe: expert_forward(fmt, xe, self.parts(layer, e), fast),
            groups=token_groups(rows),
        )
