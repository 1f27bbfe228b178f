"""GenerationStats: the ``stats`` object of ``run --json`` (docs/design.md §7). Units are in the
field names; a figure that does not apply to a run is None (null in JSON), never absent."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GenerationStats:
    clock: str  # "wall" (cpu, cuda) or "virtual" (mock)
    new_tokens: int
    seconds: float
    tokens_per_s: float | None
    ttft_s: float | None
    tpot_s: float | None
    acceptance_rate: float | None = None
    mean_accepted: float | None = None
    spec_depth_mean: float | None = None
    expert_hit_rate: float | None = None
    prefetch_precision: float | None = None
    prefetch_recall: float | None = None
    io_stall_s: float | None = None  # the compute stream waiting for an expert: a copy, a read or the CPU
    cpu_wait_s: float | None = None  # ... of it, for an expert the CPU computed (None without CPU experts)
    copy_overlap: float | None = None  # share of the copies' time the device spent computing
    bytes_h2d: int | None = None
    bytes_read: int | None = None  # read from the checkpoint's files while decoding (the disk tier)
    bound_ratio: float | None = None
    draft_routing_match: float | None = None
    cpu_expert_share: float | None = None  # share of verification lookups computed on the CPU

    @classmethod
    def from_times(cls, clock: str, token_times: list[float]) -> GenerationStats:
        """token_times[i]: seconds from the start until generated token i was ready."""
        n = len(token_times)
        total = token_times[-1] if n else 0.0
        ttft = token_times[0] if n else None
        tpot = (total - token_times[0]) / (n - 1) if n > 1 else None
        return cls(
            clock=clock,
            new_tokens=n,
            seconds=total,
            tokens_per_s=n / total if total > 0 else None,
            ttft_s=ttft,
            tpot_s=tpot,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def fill_offload_stats(stats: GenerationStats, backend, tiers, plan, target) -> None:
    """The offloading figures of a run: hit rates, prefetch precision and recall, stall,
    bytes moved, the CPU's share, and ``bound_ratio`` (docs/design.md §5)."""
    backend.finalize_timeline()
    cs = tiers.compute.stats
    stats.expert_hit_rate = cs.hit_rate
    stats.prefetch_precision = cs.prefetch_precision
    stats.prefetch_recall = cs.prefetch_recall
    stats.io_stall_s = backend.io_stall_s
    timeline = backend.timeline
    copy_s = timeline.busy("copy")
    stats.copy_overlap = timeline.overlap_s() / copy_s if copy_s else None
    stats.bytes_h2d = backend.bytes_h2d if plan.compute_tier == "device" else None
    stats.bytes_read = backend.bytes_read if plan.disk_tier else None
    if target.policy.host_compute:
        stats.cpu_expert_share = cs.host_computed / cs.lookups if cs.lookups else None
        from moespeq_cli.runtime.backends.base import WAIT_CPU

        stats.cpu_wait_s = sum(iv.duration for iv in timeline.intervals if iv.kind == "stall" and iv.name == WAIT_CPU)
    bound = lower_bound(backend, plan, target)
    stats.bound_ratio = stats.seconds / bound if bound > 0 and stats.seconds else None


def lower_bound(backend, plan, target) -> float:
    """The least time the run's tokens could take: the target's own compute (drafting is
    overhead, not a floor), or moving every expert used beyond what a tier holds across
    the link into it (plus, where experts may run on the CPU, the CPU's rate for one
    expert at a time), whichever is longest. The disk term uses the profile's bandwidth
    on the mock, and on the wall-clock backends what this run's reads achieved."""
    from moespeq_cli.runtime.planning.costs import host_expert_seconds

    ivs = backend.timeline.intervals
    compute = sum(iv.duration for iv in ivs if iv.stream == "compute" and iv.kind == "compute" and iv.phase == "target")
    used = {
        (iv.layer, iv.expert) for iv in ivs if iv.kind == "compute" and iv.expert is not None and iv.phase == "target"
    }
    terms = [compute]
    if plan.compute_tier == "device":
        rate = backend.hw.link_bandwidth / plan.expert_bytes
        if target.policy.host_compute:
            rate += 1.0 / host_expert_seconds(*target.host_cost(1), backend.hw)
        terms.append(max(0, len(used) - plan.slots) / rate)
    if plan.disk_tier:
        disk = backend.hw.disk_bandwidth if backend.name == "mock" else backend.disk_bandwidth()
        if disk:
            terms.append(max(0, len(used) - plan.host_slots) * plan.expert_bytes / disk)
    return max(terms)
