"""GenerationStats: the ``stats`` object of ``run --json`` (DESIGN.md §7). Units are in the
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
    io_stall_s: float | None = None
    bytes_h2d: int | None = None
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
