"""Speculation: MoE-SpeQ's moving parts for one run, wired together.

The 4-bit draft's executor (its experts on the device, or in host RAM for the CPU), the
governor that picks k each cycle, the ELB scheduler that turns the draft's router choices
into prefetches, and the one irreversible decision: giving the draft's memory back to
expert slots when speculation cannot pay for it (docs/governor.md). The engine builds
one of these for ``--policy moespeq`` and otherwise knows nothing about speculation.
"""

from __future__ import annotations

import torch

from moespeq_cli.runtime.backends.base import DISK_GUESS, Backend
from moespeq_cli.runtime.executors.draft import DraftExperts
from moespeq_cli.runtime.executors.offload import OffloadedExperts
from moespeq_cli.runtime.planning.costs import host_expert_seconds, transfer_seconds
from moespeq_cli.runtime.planning.planner import Plan, spread
from moespeq_cli.runtime.scheduling.elb import ElbScheduler
from moespeq_cli.runtime.scheduling.governor import Governor, GovernorState
from moespeq_cli.runtime.scheduling.routing_trace import RoutingTrace
from moespeq_cli.runtime.tiers.hierarchy import ExpertTiers


class Speculation:
    def __init__(
        self,
        model,
        plan: Plan,
        backend: Backend,
        tiers: ExpertTiers,
        target: OffloadedExperts,
        quant,
        fixed_k: int | None,
        k_max: int,
        max_slots: int | None,
        act_elem: int,
        device_type: str = "cpu",
    ):
        """``quant``: the draft's QuantizedExperts (None: no draft, k = 0 only)."""
        self.plan, self.backend, self.tiers, self.target = plan, backend, tiers, target
        self.cache = tiers.compute
        self.max_slots = max_slots
        self.released = False
        self.draft_bytes = 0  # the draft's experts in the backend's memory (device; RAM on the cpu backend)
        c = tiers.config
        self.draft: DraftExperts | None = None
        if quant is not None:
            on_device = spread(plan.draft_device_experts, list(c.moe_layers), c.num_experts)
            self.draft_bytes = quant.bytes_per_expert * len(on_device)
            backend.alloc(self.draft_bytes, "4-bit draft experts")
            self.draft = DraftExperts(
                quant.to(backend.device, on_device), backend, set(on_device), act_elem, device_type
            )
        t_host = None
        if target.policy.host_compute:

            def t_host(tokens: float) -> float:
                cost, act = target.host_cost(max(1, round(tokens)))
                return host_expert_seconds(cost, act, backend.hw)

        state = GovernorState(k_max, c.num_experts, c.top_k, self.miss_seconds(), t_host=t_host)
        state.slots, state.total_experts = self.cache.slots, plan.total_experts
        if self.draft is not None and self.draft.on_device:
            state.spare_slots = self.spare_slots()
        if state.spare_slots and fixed_k is None:  # only the auto governor releases
            target.trace = RoutingTrace(
                list(c.moe_layers),
                c.num_experts,
                c.top_k,
                self.cache.slots + state.spare_slots,
                list(self.cache.slot_of),
                # LRU: each layer's misses at both sizes (CPU experts keep a static set: not tallied)
                sizes=None if target.policy.host_compute else (self.cache.slots, self.cache.slots + state.spare_slots),
            )
            state.release_misses = self.release_misses
            state.release_layers = self.release_layers
            if not target.policy.host_compute:
                state.release_recall = target.trace.guess_recall
        self.governor = Governor(state, fixed=fixed_k if self.draft is not None else 0)  # no draft: k = 0
        self.scheduler = ElbScheduler(model, tiers, backend, target, self.governor)
        self.scheduler.on_release = self.release_draft

    def choose(self) -> int:
        """The governor's k for the next cycle, with the link's cost as measured so far."""
        self.governor.state.t_copy = self.miss_seconds()
        return self.governor.choose()

    def miss_seconds(self) -> float:
        """What an expert missing from the compute tier costs to bring in: a copy, plus a
        read for the share of experts host RAM does not hold; on the cpu backend a read,
        at the disk bandwidth this run has measured."""
        b, nbytes, plan = self.backend, self.tiers.nbytes, self.plan
        if plan.compute_tier == "host":
            return nbytes / (b.disk_bandwidth() or DISK_GUESS)  # measured: a wall-clock run has no profile
        t = transfer_seconds(nbytes, b.hw)
        if plan.disk_tier:
            off_host = 1.0 - plan.host_slots / plan.total_experts
            t += off_host * b.read_seconds(nbytes)
        return t

    # -- giving the draft's memory back ----------------------------------------------
    def spare_slots(self) -> int:
        """Full-precision slots the draft's memory (and what is left) would hold."""
        free = self.backend.capacity - self.backend.used + self.draft_bytes
        cap = self.plan.total_experts if self.max_slots is None else self.max_slots
        return int(max(0, min(cap - self.cache.slots, free // self.cache.slot_bytes)))

    def release_fill(self, n: int) -> list:
        """With CPU experts, the experts the slots gained at release take: the most
        routed so far that are not resident (a miss served on the CPU is never copied,
        so what the new slots hold is decided once)."""
        return self.target.trace.most_routed(n, set(self.cache.slot_of))

    def release_layers(self) -> dict[tuple[int, int], int] | None:
        """How often a routed token missed (a, b) experts at one layer, now and with the
        draft released (``RoutingTrace.layer_misses``; None before any token, or with CPU
        experts, whose trace does not tally them)."""
        trace = self.target.trace
        return dict(trace.layer_misses) if trace is not None and trace.layer_misses else None

    def release_misses(self) -> tuple[float, float] | None:
        """Expected misses per token of plain decoding (now, with the draft released),
        from every token the target has routed (``RoutingTrace``): with CPU experts the
        resident set stays put, without them it is LRU."""
        trace, slots, extra = self.target.trace, self.cache.slots, self.governor.state.spare_slots
        if trace is None or not trace.tokens:
            return None
        if self.target.policy.host_compute:
            resident = set(self.cache.slot_of)
            return trace.static_misses(resident), trace.static_misses(resident | set(self.release_fill(extra)))
        return trace.lru_misses(slots), trace.lru_misses(slots + extra)

    def release_draft(self) -> None:
        """The governor found k = 0 with a bigger cache faster than any speculation: the
        draft's experts are dropped (it never drafts again) and their memory becomes
        expert slots."""
        d = self.draft
        if d is None or self.released:  # no draft was loaded (k = 0 only), or it is gone already
            return
        extra = self.spare_slots()
        d.quant.drop()
        d.on_device = set()
        self.backend.free(self.draft_bytes, "4-bit draft experts")
        self.draft_bytes = 0
        fill = self.release_fill(extra) if self.target.policy.host_compute and self.target.trace else []
        if extra:
            self.backend.alloc(extra * self.cache.slot_bytes, "expert slots")
            if self.backend.name == "cuda":
                torch.cuda.empty_cache()  # the draft's blocks back to the driver before growing
            self.cache.grow(extra)
        host = self.tiers.host
        if host is not None and self.plan.disk_tier and self.plan.host_draft_bytes:
            # the draft's experts in host RAM go too: RAM holds that many more experts
            more = min(self.plan.total_experts - host.slots, self.plan.host_draft_bytes // host.slot_bytes)
            host.grow(int(more))
        for key in fill:
            self.cache.load(key, prefetch=True)
        if self.target.policy.host_compute:  # misses served on the CPU would leave the new slots empty
            c = self.tiers.config
            self.cache.fill_slots(spread(self.cache.slots, list(c.moe_layers), c.num_experts), prefetch=True)
        self.target.trace = None
        self.governor.state.slots = self.cache.slots
        self.released = True
