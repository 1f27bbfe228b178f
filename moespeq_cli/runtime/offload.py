"""The offloading executor: routed experts computed from the device expert cache.

For one MoE layer it looks up every expert the layer's tokens chose (a *hit* if it is
resident and its copy has arrived when the layer starts), computes ready experts first
while the misses' copies are in flight, waits on exactly the event of each expert it is
about to use, and sums the outputs in ascending expert order (so every policy gives the
tokens of the cpu backend, bit for bit).

``instrument`` charges the non-expert work (attention, routers, shared experts, dense
layers, LM head) to the backend's compute stream through forward hooks, so the model
code stays backend-agnostic.
"""

from __future__ import annotations

import torch
from torch import nn

from moespeq_cli.models.base import CausalLM, GatedMLP, KVCache, SparseMoE
from moespeq_cli.runtime.backends.base import Backend
from moespeq_cli.runtime.costs import attention_core_cost, elem_size, expert_cost, linear_cost, module_cost
from moespeq_cli.runtime.expert_cache import ExpertCache
from moespeq_cli.runtime.experts import expert_mlp, grouped, token_groups
from moespeq_cli.runtime.policies import Policy


class OffloadedExperts:
    def __init__(self, model: CausalLM, cache: ExpertCache, backend: Backend, policy: Policy):
        self.model, self.cache, self.backend, self.policy = model, cache, backend, policy
        c = cache.store.config
        self.hidden, self.inter = c.hidden_size, c.expert_intermediate
        self.elem = elem_size(cache.store.storage_dtype)
        layers = sorted(model.moe_blocks)
        self.next_moe = {a: b for a, b in zip(layers, layers[1:], strict=False)}
        self.gate_prefetch = policy.gate_prefetch  # the moespeq scheduler switches it per cycle
        self.layer_hook = None  # called with the layer index as each MoE layer starts
        self.lookup_hook = None  # called with (layer, needed experts, ready experts): the profile view

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        cache, st = self.cache, self.cache.stats
        if self.layer_hook is not None:
            self.layer_hook(layer)
        groups = token_groups(ids)
        needed = list(groups)
        ready = [e for e in needed if cache.ready((layer, e))]
        waiting = [e for e in needed if e not in ready]
        st.lookups += len(needed)
        st.hits += len(ready)
        st.layer_lookups[layer] += len(needed)
        st.layer_hits[layer] += len(ready)
        if self.lookup_hook is not None:
            self.lookup_hook(layer, needed, ready)
        cache.pinned.update((layer, e) for e in ready)
        for e in ready:
            cache.touch((layer, e))
        issued = set(ready)

        def issue_misses() -> None:
            for e in waiting:
                if e in issued:
                    continue
                key = (layer, e)
                if not cache.resident(key) and not cache.can_load():
                    return
                cache.load(key)
                cache.pinned.add(key)
                issued.add(e)

        if self.policy.issue_ahead:
            issue_misses()
        if self.gate_prefetch and len(issued) == len(needed):
            self.prefetch_next(layer, x)

        def run(e: int, xe: torch.Tensor) -> torch.Tensor:
            key = (layer, e)
            if e not in issued:
                cache.load(key)
                cache.pinned.add(key)
                issued.add(e)
            self.backend.wait(cache.arrival[key], layer, e)
            token = self.backend.begin()
            y = expert_mlp(xe, *cache.weights(key))
            self.backend.end(
                token, expert_cost(self.hidden, self.inter, xe.shape[0], self.elem), f"expert L{layer}.E{e}", layer, e
            )
            cache.mark_used(key)
            cache.pinned.discard(key)
            if self.policy.issue_ahead:
                issue_misses()
            return y

        out = grouped(x, ids, weights, run, order=ready + waiting, groups=groups)
        if not self.policy.keep:
            cache.evict_unpinned()
        return out

    def prefetch_next(self, layer: int, x: torch.Tensor) -> None:
        """Gate-prefetch: the next MoE layer's router on this layer's input."""
        nxt = self.next_moe.get(layer)
        if nxt is None:
            return
        block = self.model.moe_blocks[nxt]
        token = self.backend.begin()
        ids, _ = block.route(block.router_logits(x))
        g = block.gate
        self.backend.end(
            token,
            linear_cost(g.weight.numel(), g.in_features, g.out_features, x.shape[0], self.elem),
            f"gate-prefetch L{nxt}",
            nxt,
        )
        # Most-chosen experts first; the predicted set is protected while it loads, so a
        # prefetch never evicts another prefetch for the same layer.
        counts = torch.bincount(ids.flatten(), minlength=block.gate.out_features).tolist()
        predicted = sorted((e for e, n in enumerate(counts) if n), key=lambda e: (-counts[e], e))
        protected = {(nxt, e) for e in predicted} - self.cache.pinned
        self.cache.pinned |= protected
        try:
            for e in predicted:
                key = (nxt, e)
                if self.cache.resident(key):
                    continue
                if not self.cache.can_load():
                    break
                self.cache.load(key, prefetch=True)
        finally:
            self.cache.pinned -= protected


def instrument(model: CausalLM, backend: Backend, dtype: torch.dtype) -> list:
    """Charge each non-expert module's roofline cost to the backend's compute stream.
    Cost functions get (tokens, forward args); attention reads the KV cache's length
    from its args. Returns the hook handles."""
    elem = elem_size(dtype)
    handles = []

    def bracket(module: nn.Module, name: str, cost_fn, layer: int | None = None) -> None:
        state = {}

        def pre(mod, args):
            state["t"] = backend.begin()

        def post(mod, args, out):
            backend.end(state.pop("t"), cost_fn(args[0].shape[0], args), name, layer)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        heads, kv_heads, dk, dv = attn.kv_dims()

        def attn_cost(t, args, attn=attn, heads=heads, kv_heads=kv_heads, dk=dk, dv=dv):
            cache: KVCache = args[2]
            context = cache.length + t  # the cache advances after the whole forward pass
            return module_cost(attn, t, elem, extra_kernels=4) + attention_core_cost(
                heads, kv_heads, dk, dv, t, context, elem
            )

        bracket(attn, f"attention L{i}", attn_cost, i)
        mlp = layer.ffn.__self__
        if isinstance(mlp, SparseMoE):
            g = mlp.gate
            bracket(
                g,
                f"router L{i}",
                lambda t, a, g=g: linear_cost(g.weight.numel(), g.in_features, g.out_features, t, elem),
                i,
            )
            for child_name, child in mlp.named_children():
                if child_name != "gate":
                    bracket(
                        child, f"{child_name} L{i}", lambda t, a, c=child: module_cost(c, t, elem, extra_kernels=1), i
                    )
        elif isinstance(mlp, GatedMLP):
            bracket(mlp, f"mlp L{i}", lambda t, a, m=mlp: module_cost(m, t, elem, extra_kernels=1), i)
    head = model.lm_head
    bracket(head, "lm_head", lambda t, a: module_cost(head, t, elem, extra_kernels=2))
    return handles
