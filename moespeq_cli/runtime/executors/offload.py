"""The offloading executor: routed experts computed from the compute tier's expert cache
(the device's slots; host RAM's on the cpu backend).

For one MoE layer it looks up every expert the layer's tokens chose (a *hit* if it is
resident and its copy has arrived when the layer starts), computes ready experts first
while the misses' copies are in flight, waits on exactly the event of each expert it is
about to use, and sums the outputs in ascending expert order (so every policy gives the
tokens of the cpu backend, bit for bit).

With hybrid execution (policy ``hybrid``, and ``moespeq`` with CPU experts) each expert
that is not ready takes whichever path gets its output to the device first by the cost
model: its copy, or the CPU computing it from host memory (``choose_paths``). Host jobs
are issued before the GPU starts on the resident experts, so both work at once. An
expert the CPU computes must be in host RAM: with a disk tier its read comes first.
With moespeq's CPU experts, resident experts the device would reach after the CPU could
finish them go to the CPU too (``balance``): where the device's own work sets the
layer's time (experts computed one by one are about seven launches each) both processors
then work on the layer, as ``hybrid``'s static split makes them; where the device waits
for copies anyway, its resident experts are hidden behind them and stay.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from moespeq_cli.models.base import CausalLM
from moespeq_cli.runtime.backends.base import Backend
from moespeq_cli.runtime.executors.experts import expert_forward, grouped, rows_of, token_groups
from moespeq_cli.runtime.executors.grouped import (
    aligned,
    batched_parts,
    call_ops,
    combine,
    dequant_chunk,
    dequant_traffic,
    gathered,
    grouped_pairs,
    plan_layout,
    row_span,
    rows_between,
    run_phase,
)
from moespeq_cli.runtime.executors.opcount import OpCounter
from moespeq_cli.runtime.planning.costs import (
    Cost,
    device_expert_seconds,
    dtype_name,
    elem_size,
    expert_cost,
    expert_kernel,
    linear_cost,
    transfer_seconds,
)
from moespeq_cli.runtime.scheduling.policies import Policy
from moespeq_cli.runtime.tiers.hierarchy import ExpertTiers


class OffloadedExperts:
    def __init__(
        self,
        model: CausalLM,
        tiers: ExpertTiers,
        backend: Backend,
        policy: Policy,
        act_dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype | None = None,
        cpu_kernels: bool = False,
        grouped: bool = False,
    ):
        """``act_dtype``: what the (real or simulated) device computes the experts in;
        ``compute_dtype``: what the activations here really are (float32 on the mock);
        ``cpu_kernels``: experts that really run on this CPU use moespeq's CPU kernels (the
        cpu backend's compute tier, cuda's CPU experts); the engine never asks it of the
        mock, which prices torch's ops as a GPU's. ``grouped``: the compute tier is a GPU's
        slots: a layer's experts there are computed together (executors/grouped.py) where
        the format and this torch allow."""
        self.model, self.tiers, self.backend, self.policy = model, tiers, backend, policy
        self.fast_compute = cpu_kernels and backend.device.type == "cpu"  # the compute tier is this CPU
        self.fast_host = cpu_kernels  # CPU experts beside a device
        self.cache = tiers.compute
        c = tiers.config
        self.hidden, self.inter = c.hidden_size, c.expert_intermediate
        compact = c.expert_format.compact  # the tiers hold the stored bytes (MXFP4)
        weights = c.dtype if compact else tiers.layout.dtype  # the dense weights' dtype
        self.elem = elem_size(weights)
        # what an expert's weights take a weight: its bytes over its 3 H I weights when compact
        self.expert_elem = tiers.nbytes / (3 * self.hidden * self.inter) if compact else self.elem
        # the kernel the code runs for an expert (its layout, its weights' dtype, the
        # activations'): the curve `calibrate` measured for it prices it (docs/mock-backend.md)
        act_dtype = act_dtype or weights
        fmt = c.expert_format
        self.kernel = expert_kernel(fmt, weights, act_dtype)
        # the ops one expert dispatches, counted on the function itself (a GPU computing in its
        # own dtype does not run the casts of float32 numerics)
        self.format = fmt
        parts = [torch.zeros(s, dtype=d) for s, d in zip(fmt.shapes(32, 32), fmt.part_dtypes(weights), strict=True)]
        x = torch.zeros(1, 32, dtype=compute_dtype or act_dtype)
        with torch.inference_mode(), OpCounter(skip_casts=act_dtype != (compute_dtype or act_dtype)) as counter:
            expert_forward(fmt, x, parts)
        self.expert_ops = counter.ops
        self.grouped = None  # where an expert's matrices lie in a device slot, when computed together
        self.grouped_elem = self.expert_elem  # bytes a weight a grouped computation moves
        layout = self.cache.layout
        if grouped and not layout.stride:
            at = batched_parts(fmt, layout.views, layout.numel, layout.dtype)
            # a GPU's grouped GEMM (and the mock's stand-in for one) takes 16-byte aligned
            # matrices only; an expert shape that misaligns them is computed one by one there
            fits = backend.name == "cpu" or (at is not None and aligned(at, layout.numel, elem_size(act_dtype)))
            if at is not None and fits and backend.groups(act_dtype, compute_dtype or act_dtype):
                self.grouped = at
                tiles = at.compact is None or at.compact.tiles
                self.grouped_call_ops = call_ops(fmt, at.fused, tiles=tiles)
                if at.compact is not None:  # the dequantization's traffic, then the product reads its result
                    self.grouped_elem = dequant_traffic(fmt, act_dtype, tiles) + elem_size(act_dtype)
        self.grouped_kernel = "grouped:" + dtype_name(act_dtype)
        layers = sorted(model.moe_blocks)
        self.next_moe = {a: b for a, b in zip(layers, layers[1:], strict=False)}
        self.gate_prefetch = policy.gate_prefetch  # the moespeq scheduler switches it per cycle
        self.layer_hook = None  # called with the layer index as each MoE layer starts
        self.lookup_hook = None  # called with (layer, needed experts, ready experts): the profile view
        self.decisions: list | None = None  # set to [] to record every copy-or-CPU choice (tests)
        self.trace = None  # a RoutingTrace, while the governor may still release the draft

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, rows, ahead=None):
        """``rows``: ``ids`` on the host; ``ahead``: the next MoE layer's routing by this
        layer's input, read with it (``lookahead``: gate-prefetch)."""
        cache, st = self.cache, self.cache.stats
        ahead = ahead if self.gate_prefetch else None  # a paired router guesses whatever the policy
        if self.layer_hook is not None:
            self.layer_hook(layer)
        self.backend.sync(1, "route")  # the routing reaches the host (one read): it decides the copies
        if self.trace is not None:
            self.trace.record(layer, rows)
            if ahead is not None and layer in self.next_moe and len(rows) == 1:
                # a decoded token's guess (a prompt's is the union over its tokens: it
                # would catch nearly every expert and say nothing of decoding)
                self.trace.guess(self.next_moe[layer], ahead)
        groups = token_groups(rows)
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
        host_jobs = {}
        if waiting and self.policy.host_compute:
            on_host = self.choose_paths(layer, ready, waiting, groups)
            st.host_misses += len(on_host)  # not arrived (a prefetch still in flight did not serve it)
            for e in on_host:
                host_jobs[e] = self.compute_on_host(layer, e, rows_of(x, groups[e][0], self.backend))
            waiting = [e for e in waiting if e not in host_jobs]
        if ready and self.policy.host_compute and not self.policy.static:
            for e in self.balance(layer, ready, waiting, groups, x, host_jobs):
                ready.remove(e)
                cache.mark_used((layer, e))
                cache.pinned.discard((layer, e))
        st.host_computed += len(host_jobs)
        issued = set(ready)
        copies_allowed = not self.policy.static

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

        if self.policy.issue_ahead and copies_allowed:
            issue_misses()
        if ahead is not None and len(issued) + len(host_jobs) == len(needed):
            self.prefetch_next(layer, ahead)
        if self.grouped is not None:
            out = self.compute_grouped(layer, x, weights, groups, ready, waiting, host_jobs, issued)
            if out is not None:
                if not self.policy.keep:
                    cache.evict_unpinned()
                return out

        def run(e: int, xe: torch.Tensor) -> torch.Tensor:
            if e in host_jobs:
                return self.backend.host_result(host_jobs[e])
            key = (layer, e)
            if e not in issued:
                cache.load(key)
                cache.pinned.add(key)
                issued.add(e)
            self.backend.wait(cache.arrival[key], layer, e)
            token = self.backend.begin()
            y = expert_forward(self.format, xe, cache.weights(key), self.fast_compute)
            self.backend.end(token, self.host_cost(xe.shape[0])[0], f"expert L{layer}.E{e}", layer, e)
            cache.mark_used(key)
            cache.pinned.discard(key)
            if self.policy.issue_ahead and copies_allowed:
                issue_misses()
            return y

        out = grouped(x, ids, weights, run, order=ready + waiting + list(host_jobs), groups=groups)
        if not self.policy.keep:
            cache.evict_unpinned()
        return out

    def compute_grouped(self, layer: int, x, weights, groups, ready: list[int], waiting: list[int], host_jobs, issued):
        """The layer's experts in at most two grouped computations (executors/grouped.py):
        those already in the device's slots at once, while the copies of the rest (issued
        now if not yet) are in flight, then those after waiting for them; their outputs
        summed with the CPU's. A prompt's tokens go a part at a time (``grouped_pairs``),
        every expert held in its slot, an expert waited for where it is first used, and a
        CPU expert's output where a part first uses it (the part's device calls queued
        first), each part taking its rows of it. None when the slots cannot hold every miss
        at once (every other slot pinned): the caller then goes expert by expert, as slots
        free up."""
        cache, b = self.cache, self.backend
        for e in waiting:
            key = (layer, e)
            if e in issued:
                continue
            if not cache.resident(key) and not cache.can_load():
                return None
            cache.load(key)
            cache.pinned.add(key)
            issued.add(e)
        device = ready + waiting
        where = {e: self.block_row(cache.slot_of[(layer, e)]) for e in device}
        # the used slots gathered first: compact ones to be dequantized, or the mock's float32
        # numerics of a bf16 GPU's weights
        gather = cache.layout.dtype != x.dtype
        # the ready experts go first, apart, when their call would end before the misses
        # land (it then hides behind the copies); otherwise one call after the copies is
        # cheaper than two
        landing = max((cache.arrival[(layer, e)].time for e in waiting), default=0.0) - b.now_event_time()
        split = bool(ready and waiting) and landing > self.grouped_call_ops * b.hw.launch_overhead
        phases = [ready, waiting] if split else [ready + waiting]
        chunk = dequant_chunk(self.tiers.config.top_k) if self.grouped.compact is not None else None

        def widened(block, cols):
            # dequantizing is work on the GPU too; widening the mock's float32 copy of a
            # bf16 GPU's weights is not (the GPU computes in the weights' dtype)
            free = self.grouped.compact is None
            with b.uncounted() if free else contextlib.nullcontext():
                return gathered(self.grouped, block, cols, x.dtype)

        # a prompt's tokens a few thousand (token, expert) pairs at a time, every expert
        # staying in its slot: what the calls hold at once stays what the plan reserves
        T, k = weights.shape
        pairs = grouped_pairs(self.tiers.config.num_experts)
        step = T if T * k <= pairs else max(1, pairs // k)
        out = None if step == T else torch.empty_like(x)
        waited: set[int] = set()
        host_out: dict[int, torch.Tensor] = {}
        for a in range(0, T, step):
            rows = groups if step == T else rows_between(groups, a, a + step)
            # after the first part every copy issued has been waited for or is waited for
            # below: one call for the part
            parts = phases if a == 0 else [ready + waiting]
            phases_here = [[e for e in experts if e in rows] for experts in parts]
            on_host = sorted(e for e in host_jobs if e in rows)
            layout = plan_layout(rows, phases_here, where, on_host, min(step, T - a), k, gather, chunk)
            meta = b.upload(layout.values)
            outs = []
            for phase, experts in enumerate(phases_here):
                if not experts:
                    continue
                for e in experts:
                    if e in waiting and e not in waited:  # where the layer's tokens first use it
                        b.wait(cache.arrival[(layer, e)], layer, e)
                        waited.add(e)
                token = b.begin()
                outs += run_phase(
                    self.format, self.grouped, cache.blocks, layout, meta, x[a : a + step], phase, widened
                )
                costs = [self.grouped_cost(len(rows[e][0])) for e in experts]
                b.end(token, sum(costs[1:], costs[0]), f"experts L{layer}", layer)
            # the CPU's outputs last: the device's calls are queued before the host waits for them
            for e in on_host:
                if e not in host_out:
                    host_out[e] = b.host_result(host_jobs[e])
                if step == T:  # (one part: decoding, a verification, a short prompt)
                    outs.append(host_out[e])
                else:
                    lo, hi = row_span(groups[e][0], a, a + step)
                    outs.append(host_out[e][lo:hi])
            token = b.begin()
            part = combine(layout, meta, outs, weights[a : a + step], x.dtype)
            b.end(token, Cost(0.0, 0.0, 0), f"experts sum L{layer}", layer)
            if out is None:
                out = part
            else:
                out[a : a + step] = part
        release = b.record_release()  # one event for the layer's calls (a CUDA event each costs the host)
        for e in device:  # their slots are free to refill once the last call has read them
            cache.mark_used((layer, e), release)
            cache.pinned.discard((layer, e))
        return out

    def grouped_cost(self, tokens: int) -> Cost:
        """An expert's work within a grouped computation: its weights and tokens (compact:
        the bytes dequantizing them moves, counted, and the product's read of the result),
        priced by the grouped kernel's curve where the profile has one (else the roofline);
        the launches are the grouped call's, counted once for all."""
        return expert_cost(self.hidden, self.inter, tokens, self.grouped_elem, self.grouped_kernel, 0)

    def block_row(self, slot: int) -> tuple[int, int]:
        """A slot's (block, row in the block): the cache grows by whole blocks."""
        for i, block in enumerate(self.cache.blocks):
            if slot < block.shape[0]:
                return i, slot
            slot -= block.shape[0]
        raise IndexError(slot)

    # -- hybrid execution: copy it, or compute it on the CPU ----------------------
    def host_cost(self, tokens: int) -> tuple[Cost, int]:
        """(the expert's cost over ``tokens`` tokens, activation bytes each way)."""
        cost = expert_cost(self.hidden, self.inter, tokens, self.expert_elem, self.kernel, ops=self.expert_ops)
        return cost, tokens * self.hidden * self.elem

    def device_seconds(self, tokens: int) -> float:
        """The device's time for one expert over ``tokens`` tokens: its share of the grouped
        kernel's call where the device groups them, else its own region (its kernels and the
        host time the profile measured for an expert region, as the mock charges it)."""
        grouped = self.grouped is not None
        cost = self.grouped_cost(tokens) if grouped else self.host_cost(tokens)[0]
        return device_expert_seconds(cost, self.backend.hw, grouped)

    def choose_paths(self, layer: int, ready: list[int], waiting: list[int], groups) -> list[int]:
        """For each expert not ready, the path whose output reaches the device first, by the
        backend's clock and the cost model: its copy (already in flight, or issued now behind
        the copies chosen before it) and then the device computing it once it is free (after
        the resident experts and the copies chosen before it), or the CPU (behind the host
        jobs chosen before it). An expert that is not in host RAM is read first either way,
        behind the reads before it. Returns the experts to compute on the CPU; ``decisions``
        keeps every comparison."""
        b, cache, host = self.backend, self.cache, self.tiers.host
        nbytes = self.tiers.nbytes
        now = b.now_event_time()
        copy_at = b.copy_eta(nbytes)
        copy_step = transfer_seconds(nbytes, b.hw)
        read_at = None  # when the reads issued so far would be done
        host_free = None  # when the CPU finishes the host jobs chosen so far
        device_free = now + sum(self.device_seconds(len(groups[e][0])) for e in ready)  # computed first
        on_host = []
        for e in waiting:
            key = (layer, e)
            cost, act = self.host_cost(len(groups[e][0]))
            read_done = None
            if host is not None and not host.ready(key):
                if host.resident(key):
                    read_done = host.arrival[key].time
                else:
                    step = b.read_seconds(nbytes)
                    read_at = b.read_eta(nbytes) if read_at is None else read_at + step
                    read_done = read_at
            if host_free is None:
                host_done = b.host_eta(cost, act)
            else:
                down = now + transfer_seconds(act, b.hw)
                host_done = max(host_free, down) + cost.host_seconds(b.hw) + transfer_seconds(act, b.hw)
            if read_done is not None:
                host_done = max(host_done, read_done + cost.host_seconds(b.hw) + transfer_seconds(act, b.hw))
            if cache.resident(key):
                via_copy = cache.arrival[key].time  # in flight
            elif self.policy.static:
                via_copy = float("inf")
            else:
                via_copy = copy_at  # optimistic when every slot is pinned: the copy then waits for one
                if read_done is not None:
                    via_copy = max(via_copy, read_done + copy_step)
            # the copied expert's output: once it has landed and the device is free, computed
            device_done = max(via_copy, device_free) + self.device_seconds(len(groups[e][0]))
            choice = "cpu" if host_done < device_done else "copy"
            if self.decisions is not None:
                self.decisions.append((layer, e, {"copy": device_done, "cpu": host_done}, choice))
            if choice == "cpu":
                on_host.append(e)
                host_free = host_done - transfer_seconds(act, b.hw)
            else:
                device_free = device_done
                if not cache.resident(key):
                    copy_at = max(copy_at, via_copy) + copy_step if read_done is not None else copy_at + copy_step
        return on_host

    def balance(self, layer: int, ready: list[int], waiting: list[int], groups, x, host_jobs: dict) -> list[int]:
        """Resident experts to compute on the CPU instead, issued into ``host_jobs``: from
        the last the device would reach, each whose output the CPU gets to the device
        before the device would have finished the layer without it (by the backend's
        clock and the cost model, as ``choose_paths``: the resident experts, then each
        waiting one once its copy lands). Returns them."""
        b, cache, host = self.backend, self.cache, self.tiers.host
        if host is not None and any(not host.ready((layer, e)) for e in waiting):
            return []  # a read from disk comes first: the device waits for it anyway
        t_dev = {e: self.device_seconds(len(groups[e][0])) for e in ready + waiting}
        landing, copy_at = [], b.copy_eta(self.tiers.nbytes)
        for e in waiting:  # in flight, or copied in turn once issued
            if cache.resident((layer, e)):
                landing.append(cache.arrival[(layer, e)].time)
            else:
                landing.append(copy_at)
                copy_at += transfer_seconds(self.tiers.nbytes, b.hw)

        def device_end(resident_work: float) -> float:
            t = b.now_event_time() + resident_work
            for e, at in zip(waiting, landing, strict=True):
                t = max(t, at) + t_dev[e]
            return t

        work = sum(t_dev[e] for e in ready)
        moved = []
        for e in reversed(ready):
            if host is not None and not host.ready((layer, e)):
                break
            end = device_end(work)
            if device_end(work - t_dev[e]) >= end:
                break  # the copies set the layer's end: the resident experts are hidden behind them
            host_done = b.host_eta(*self.host_cost(len(groups[e][0])))
            choice = "cpu" if host_done < end else "device"
            if self.decisions is not None:
                self.decisions.append((layer, e, {"device": end, "cpu": host_done}, choice))
            if choice == "device":
                break
            host_jobs[e] = self.compute_on_host(layer, e, rows_of(x, groups[e][0], self.backend))
            host_jobs[e].balanced = True
            work -= t_dev[e]
            moved.append(e)
        return moved

    def compute_on_host(self, layer: int, e: int, xe: torch.Tensor):
        cost, act = self.host_cost(xe.shape[0])
        weights, read = self.tiers.host_expert((layer, e))

        def fn(xh: torch.Tensor) -> torch.Tensor:
            return expert_forward(self.format, xh, weights, self.fast_host)

        job = self.backend.host_compute(xe, fn, cost, act, f"cpu expert L{layer}.E{e}", layer, e, after=read)
        self.tiers.host.hold((layer, e), job.event)  # its host slot stays until the CPU is done
        return job

    def lookahead(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Gate-prefetch: the next MoE layer's router applied to this layer's input, on the
        device, so that its choice reaches the host in the same read as this layer's
        routing (one sync a layer). Computed whenever gate-prefetch is on; used when every
        miss of this layer has been issued (``prefetch_next``)."""
        nxt = self.next_moe.get(layer)
        if not self.gate_prefetch or nxt is None:
            return None
        block = self.model.moe_blocks[nxt]
        token = self.backend.begin()
        ids = block.choose(block.router_logits(x, hooked=False))  # charged here, once
        g = block.gate
        self.backend.end(
            token,
            linear_cost(g.weight.numel(), g.in_features, g.out_features, x.shape[0], self.elem),
            f"gate-prefetch L{nxt}",
            nxt,
        )
        return ids

    def paired_logits(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Paired routers (``CausalLM.pair_routers``): the layer's router and the next MoE
        layer's, applied to this layer's input in one product ``[T, 2E]``, charged here as
        one region, whether gate-prefetch is on or not (a GEMM's columns can round
        differently with its width: one product for every policy keeps their routing the
        same bits). None for a layer without a pair."""
        pair = self.model.moe_blocks[layer].pair
        if pair is None:
            return None
        token = self.backend.begin()
        logits = F.linear(x, pair)
        rows, cols = pair.shape
        self.backend.end(
            token,
            linear_cost(pair.numel(), cols, rows, x.shape[0], self.elem),
            f"router L{layer}",  # the layer's router, whose product holds the next one's guess too
            layer,
        )
        return logits

    def prefetch_next(self, layer: int, ahead: list[int]) -> None:
        """Gate-prefetch: load what the next MoE layer's router chose on this layer's input
        (``ahead``, its ids flattened, on the host)."""
        nxt = self.next_moe[layer]
        block = self.model.moe_blocks[nxt]
        counts = [0] * block.gate.out_features
        for e in ahead:
            counts[e] += 1
        # Most-chosen experts first; the predicted set is protected while it loads, so a
        # prefetch never evicts another prefetch for the same layer.
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
