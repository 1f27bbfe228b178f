"""Charging the non-expert work to the backend's clock.

``instrument`` hangs forward hooks on every non-expert module (attention, routers, shared
experts, dense layers, LM head) that bracket it with ``backend.begin()`` / ``end(cost)``,
so the model code stays backend-agnostic: the mock prices each module by its roofline
cost (``charges``), the wall-clock backends record how long it really took. The routed
experts are charged by their executors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moespeq_cli.models.base import CausalLM, GatedMLP, SparseMoE, window_bound, window_keep
from moespeq_cli.models.deepseek_v2 import MLAttention
from moespeq_cli.runtime.backends.base import Backend
from moespeq_cli.runtime.planning.costs import Cost, attention_core_cost, elem_size, linear_cost, module_cost


def charges(
    model: CausalLM, elem: int, weight_elem: int | None = None, paired: bool = False
) -> list[tuple[nn.Module, str, int | None, Callable[[int, int], Cost], bool]]:
    """Every non-expert module the clock charges: (module, name, layer, cost(tokens,
    context), whether its cost depends on the KV cache's length). ``elem``: bytes of an
    activation (and of the KV cache), ``weight_elem``: of a dense weight (default the
    same). The routed experts are charged by their executors; ``moespeq plan`` prices a
    decode step from this table, ``paired`` where the runtime will pair the routers
    (``CausalLM.pair_routers``: a router's product then holds the next MoE layer's rows,
    charged by the executor as the router's region)."""
    w = weight_elem
    table = []
    last_moe = max(model.moe_blocks, default=None)
    paired = paired and model.pairable_routers()
    for i, layer in enumerate(model.model.layers):
        attn = layer.attn

        def attn_cost(t, context, attn=attn):
            window = getattr(getattr(attn, "s", None), "window", None)
            if window:  # a sliding-window layer attends over what it holds (models/base.py KVCache)
                context = min(context, max(window_bound(window, None), window_keep(window) + t))
            if isinstance(attn, MLAttention):  # absorbed or expanded, as it runs for t over context
                dims, rows = attn.kv_dims(t, context), {id(attn.kv_b_proj): attn.expansion_rows(t, context)}
            else:
                dims, rows = attn.kv_dims(), None
            return module_cost(attn, t, elem, extra_kernels=4, weight_elem=w, rows=rows) + attention_core_cost(
                *dims, t, context, elem
            )

        table.append((attn, f"attention L{i}", i, attn_cost, True))
        mlp = layer.ffn
        if isinstance(mlp, SparseMoE):
            g = mlp.gate
            rows = g.out_features * (2 if paired and i != last_moe else 1)
            table.append(
                (
                    g,
                    f"router L{i}",
                    i,
                    lambda t, c, g=g, rows=rows: linear_cost(rows * g.in_features, g.in_features, rows, t, elem, w),
                    False,
                )
            )
            for child_name, child in mlp.named_children():
                if child is not g:  # the router, charged above (gpt-oss names it `router`)
                    table.append(
                        (
                            child,
                            f"{child_name} L{i}",
                            i,
                            lambda t, c, m=child: module_cost(m, t, elem, extra_kernels=1, weight_elem=w),
                            False,
                        )
                    )
        # dense MLPs: the layer's feed-forward, or one beside its MoE (Gemma 4)
        for name, child in layer.named_children():
            if isinstance(child, GatedMLP):
                table.append(
                    (
                        child,
                        f"{name} L{i}",
                        i,
                        lambda t, c, m=child: module_cost(m, t, elem, extra_kernels=1, weight_elem=w),
                        False,
                    )
                )
    head = model.lm_head
    table.append(
        (head, "lm_head", None, lambda t, c: module_cost(head, t, elem, extra_kernels=2, weight_elem=w), False)
    )
    return table


def instrument(model: CausalLM, backend: Backend, dtype: torch.dtype, weights: torch.dtype | None = None) -> list:
    """Charge each non-expert module's cost to the backend's compute stream through
    forward hooks (``dtype``: what the device computes in). Attention reads the KV cache's
    length from its args (the cache advances after the whole forward pass); ``weights``: what
    the dense weights are held in, where not ``dtype`` (the CPU kernels' bf16). Every forward
    pass is bracketed too (``begin_pass``/``end_pass``: the mock counts what it dispatched).
    Returns the hook handles."""
    handles = [
        model.register_forward_pre_hook(lambda mod, args: backend.begin_pass()),
        model.register_forward_hook(lambda mod, args, out: backend.end_pass()),
    ]
    w_elem = elem_size(weights) if weights is not None else None
    for module, name, layer, cost, reads_cache in charges(model, elem_size(dtype), w_elem):
        state = {}

        def pre(mod, args, state=state):
            state["t"] = backend.begin()

        def post(mod, args, out, state=state, name=name, layer=layer, cost=cost, reads_cache=reads_cache):
            t = args[0].shape[0]
            context = args[2].length - args[2].offset(layer) + t if reads_cache else 0  # the keys it holds
            backend.end(state.pop("t"), cost(t, context), name, layer)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles
