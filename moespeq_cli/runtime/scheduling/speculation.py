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
from moespeq_cli.runtime.scheduling.governor import Governor, GovernorState, off_ram_share
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
        act_dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype | None = None,
    ):
        """``quant``: the draft's QuantizedExperts (None: no draft, k = 0 only);
        ``act_dtype``: what the (real or simulated) device computes in, ``compute_dtype``
        what the activations here really are (float32 on the mock)."""
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
            blocks = {}
            act_dtype = act_dtype or quant.dtype
            if (
                plan.draft_scratch_bytes  # the plan chose grouped draft calls (executors/draft.py) and reserved them
                and device_type == "cuda"
                and quant.stackable()
                and backend.groups(act_dtype, compute_dtype or act_dtype)
            ):  # a layer's device experts in one grouped call: the layers wholly on the device
                placed = set(on_device)
                whole = [n for n in c.moe_layers if all((n, e) in placed for e in range(c.num_experts))]
                blocks = quant.stack(whole, backend.device)
                self.draft_bytes += plan.draft_scratch_bytes
            backend.alloc(self.draft_bytes, "4-bit draft experts")
            self.draft = DraftExperts(
                quant.to(backend.device, on_device),
                backend,
                set(on_device),
                act_elem,
                device_type,
                blocks,
                c.top_k,
                act_dtype,
            )
        t_host = None
        if target.policy.host_compute:

            def t_host(tokens: float) -> float:
                cost, act = target.host_cost(max(1, round(tokens)))
                return host_expert_seconds(cost, act, backend.hw)

        state = GovernorState(k_max, c.num_experts, c.top_k, self.miss_seconds(*self.miss_parts()), t_host=t_host)
        state.slots, state.total_experts = self.cache.slots, plan.total_experts
        if self.draft is not None and self.draft.on_device:
            state.spare_slots = self.spare_slots()
        state.host_slots = tiers.host.slots if tiers.host is not None and plan.disk_tier else 0
        if self.draft is not None:
            state.host_spare = self.host_spare()
        if (state.spare_slots or state.host_spare) and fixed_k is None:  # only the auto governor releases
            target.trace = RoutingTrace(
                list(c.moe_layers),
                c.num_experts,
                c.top_k,
                max(self.cache.slots, self.ram_reach(state.host_spare)) + state.spare_slots,
                list(self.cache.slot_of),
                # LRU: each layer's misses at both sizes (CPU experts keep a static set: not tallied)
                sizes=None if target.policy.host_compute else (self.cache.slots, self.cache.slots + state.spare_slots),
            )
            state.release_misses = self.release_misses
            state.release_layers = self.release_layers
            if not target.policy.host_compute:
                state.release_recall = target.trace.guess_recall
            if state.host_spare:
                state.release_reads = self.release_reads
        self.governor = Governor(state, fixed=fixed_k if self.draft is not None else 0)  # no draft: k = 0
        self.scheduler = ElbScheduler(model, tiers, backend, target, self.governor)
        self.scheduler.on_release = self.release_draft

    def choose(self) -> int:
        """The governor's k for the next cycle, with the link's cost as measured so far."""
        state = self.governor.state
        state.t_link, state.t_read = self.miss_parts()
        state.t_copy = self.miss_seconds(state.t_link, state.t_read)
        return self.governor.choose()

    def miss_parts(self) -> tuple[float, float]:
        """(copy, read): an expert's copy over the link, and its read from disk (0 without
        a disk tier); on the cpu backend (no link) a read, at the disk bandwidth this run
        has measured."""
        b, nbytes, plan = self.backend, self.tiers.nbytes, self.plan
        if plan.compute_tier == "host":
            return 0.0, nbytes / (b.disk_bandwidth() or DISK_GUESS)  # measured: a wall-clock run has no profile
        read = b.read_seconds(nbytes) if plan.disk_tier and self.tiers.host is not None else 0.0
        return transfer_seconds(nbytes, b.hw), read

    def miss_seconds(self, link: float, read: float) -> float:
        """What an expert missing from the compute tier costs to bring in (``miss_parts``):
        a copy, plus a read for the share of experts host RAM does not hold (uniform
        routing); on the cpu backend a read."""
        if self.plan.compute_tier == "host" or not read:
            return link + read
        return link + off_ram_share(self.tiers.host.slots, self.plan.total_experts) * read

    # -- giving the draft's memory back ----------------------------------------------
    def spare_slots(self) -> int:
        """Full-precision slots the draft's memory (and what is left) would hold."""
        free = self.backend.capacity - self.backend.used + self.draft_bytes
        cap = self.plan.total_experts if self.max_slots is None else self.max_slots
        return int(max(0, min(cap - self.cache.slots, free // self.cache.slot_bytes)))

    def host_spare(self) -> int:
        """Experts host RAM would hold more once the draft's 4-bit experts kept there are
        given back (a disk tier only: otherwise RAM holds every expert already)."""
        host, plan = self.tiers.host, self.plan
        if host is None or not plan.disk_tier or not plan.host_draft_bytes or self.released:
            return 0
        return int(max(0, min(plan.total_experts - host.slots, plan.host_draft_bytes // host.slot_bytes)))

    def ram_reach(self, more: int) -> int:
        """Distinct experts the device and host RAM hold together, RAM holding ``more``
        experts more, as an LRU over every routed expert would see them: RAM keeps what it
        read for a copy (the device's experts are in it too), but with CPU experts the
        device's set is placed once and RAM serves only the others."""
        host = self.tiers.host
        if host is None:
            return 0
        return host.slots + more + (self.cache.slots if self.target.policy.host_compute else 0)

    def release_reads(self) -> tuple[float, float] | None:
        """Disk reads per token of plain decoding (now, with the draft released): the
        routed tokens' misses of an LRU the size of ``ram_reach`` (RoutingTrace)."""
        trace, state = self.target.trace, self.governor.state
        if trace is None or not trace.tokens or self.tiers.host is None:
            return None
        extra = state.spare_slots if self.target.policy.host_compute else 0
        now = trace.lru_misses(self.ram_reach(0))
        then = trace.lru_misses(self.ram_reach(state.host_spare) + extra)
        return (now, then) if now is not None and then is not None else None

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
        extra, more_in_ram = self.spare_slots(), self.host_spare()
        d.drop()
        self.backend.free(self.draft_bytes, "4-bit draft experts")
        self.draft_bytes = 0
        fill = self.release_fill(extra) if self.target.policy.host_compute and self.target.trace else []
        if extra:
            self.backend.alloc(extra * self.cache.slot_bytes, "expert slots")
            if self.backend.name == "cuda":
                torch.cuda.empty_cache()  # the draft's blocks back to the driver before growing
            self.cache.grow(extra, after=self.backend.record_release())
        if more_in_ram:  # the draft's experts in host RAM go too: RAM holds that many more experts
            self.tiers.host.grow(more_in_ram)
        for key in fill:
            self.cache.load(key, prefetch=True)
        if self.target.policy.host_compute:  # misses served on the CPU would leave the new slots empty
            c = self.tiers.config
            self.cache.fill_slots(spread(self.cache.slots, list(c.moe_layers), c.num_experts), prefetch=True)
        self.target.trace = None
        state = self.governor.state
        state.slots = self.cache.slots
        state.host_slots += more_in_ram
        state.host_spare = 0
        self.released = True
