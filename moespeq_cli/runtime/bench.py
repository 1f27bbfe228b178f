"""Policies side by side on one model, hardware profile and budget (docs/design.md §4-§5).

Every policy generates the same tokens (greedy) from the same prompt on the same engine;
the table compares time, hit rate, stall share and bytes moved, with each policy's
speedup over the baselines and its ratio to the physical lower bound.

Budgets: "same memory" (SM) gives every policy the same ``--vram`` (moespeq pays its 4-bit
draft out of it); "same cache" (SC) gives every policy the same number of full-precision
expert slots (moespeq gets the draft's bytes on top).
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from moespeq_cli.fs import give_back_freed_memory
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.runtime.engine import Engine, EngineOptions
from moespeq_cli.runtime.planning.planner import checkpoint_plan, draft_bytes_estimate, spread
from moespeq_cli.runtime.sampling import SamplingParams
from moespeq_cli.runtime.stats import GenerationStats

BASELINES = ("ondemand", "lru", "gate-prefetch", "hybrid")


@dataclass
class BenchResult:
    policy: str
    label: str
    vram_bytes: int
    slots: int
    draft_bytes: int
    stats: GenerationStats
    token_ids: list[int]
    speedup_vs: dict[str, float | None] = field(default_factory=dict)
    draft_released: bool = False  # the governor gave the draft's memory to expert slots
    mean_union: float | None = None  # distinct experts per verified MoE layer
    union_bound: int | None = None  # (k+1) x top_k over the same verifications, at most a layer's experts
    draft_token_s: float | None = None  # the draft's compute per drafted token
    target_compute_s: float | None = None  # the target's compute (all of it, from the timeline)
    fills: int | None = None  # experts brought into the compute tier while generating
    fills_min: int | None = None  # the fewest any cache of the same slots needs for the same uses (Belady)
    disk_bandwidth: float | None = None  # what the run's reads achieved while the disk was busy (B/s)
    disk_queue: list[float] | None = None  # ... with 1, 2, .. reads in flight (B/s, non-decreasing)
    regions: dict[str, list[float]] = field(default_factory=dict)  # Timeline.breakdown of the run

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stats"] = self.stats.to_dict()
        return d


def queue_curve(reads: list, depth: int) -> list[float] | None:
    """What the disk served in total with 1 .. ``depth`` reads in flight (B/s), from a run's
    read intervals: each read's bytes spread evenly over its interval, summed over the
    times when n were in flight; made non-decreasing (calibrate.non_decreasing); a depth
    the run never reached takes its neighbour's figure. None without reads."""
    from moespeq_cli.runtime.planning.calibrate import non_decreasing

    points = sorted({t for iv in reads for t in (iv.start, iv.end)})
    served, spent = [0.0] * (depth + 1), [0.0] * (depth + 1)
    events = sorted((t, kind, i) for i, iv in enumerate(reads) for t, kind in ((iv.start, 1), (iv.end, 0)))
    active: set[int] = set()
    e = 0
    for a, b in zip(points, points[1:], strict=False):
        while e < len(events) and events[e][0] <= a:
            _, kind, i = events[e]
            (active.add if kind else active.discard)(i)
            e += 1
        n = min(len(active), depth)
        if n and b > a:
            spent[n] += b - a
            served[n] += (b - a) * sum(reads[i].bytes / max(reads[i].duration, 1e-9) for i in active)
    figures = [served[n] / spent[n] if spent[n] > 1e-3 else None for n in range(1, depth + 1)]
    if all(f is None for f in figures):
        return None
    for n in range(depth):  # a depth never reached: the nearest one's figure
        if figures[n] is None:
            near = min((abs(m - n), m) for m in range(depth) if figures[m] is not None)[1]
            figures[n] = figures[near]
    return non_decreasing(figures)


def belady_misses(uses: list, slots: int, resident: list = ()) -> int:
    """The fewest fills any cache of ``slots`` slots needs to serve ``uses`` in order
    (Belady's MIN: on a miss, evict what is next used farthest ahead), starting from
    ``resident``. The floor for every policy that computes the same uses in the same order."""
    nxt, last = [0] * len(uses), {}
    for i in range(len(uses) - 1, -1, -1):
        nxt[i] = last.get(uses[i], len(uses))
        last[uses[i]] = i
    cache = {key: last.get(key, len(uses)) for key in list(resident)[:slots]}  # key -> its next use
    misses = 0
    for i, key in enumerate(uses):
        if key not in cache:
            misses += 1
            if len(cache) >= slots:
                del cache[max(cache, key=cache.get)]
        cache[key] = nxt[i]
    return misses


def baseline_slots(path: Path, context: int, opts: EngineOptions) -> int:
    """The full-precision slots the baselines get with ``opts``' budget: the same-cache
    budget caps moespeq's slots at this, whatever it does with the draft's bytes."""
    return Engine(path, replace(opts, policy="lru", cpu_experts=None)).make_plan(context).slots


def budget_for(path: Path, context: int, slots_fraction: float, dtype=None) -> tuple[int, int]:
    """(vram for the baselines with ``slots_fraction`` of all experts as slots, that slot count)."""
    ck = Checkpoint(path)
    plan = checkpoint_plan(ck, context, dtype=dtype)
    slots = max(ck.config.top_k, plan.total_experts * slots_fraction)
    return plan.fixed_bytes + int(slots * plan.expert_bytes), int(slots)


def run_policy(
    path: Path,
    prompt_ids: list[int],
    new_tokens: int,
    policy: str,
    opts: EngineOptions,
    label: str | None = None,
    repeats: int = 1,
) -> BenchResult:
    """Load ``policy`` with ``opts`` and decode ``new_tokens`` greedily. ``repeats`` > 1
    decodes again on the same loaded engine and keeps the median run by its time (for
    timing host costs on a noisy machine without paying the load each time; a repeat
    starts from the cache the previous run left, so use it where every expert is resident)."""
    cpu = opts.cpu_experts if policy in ("moespeq", "hybrid") else None
    eng = Engine(path, replace(opts, policy=policy, cpu_experts=cpu))
    results = []
    try:
        eng.load(opts.context or len(prompt_ids) + new_tokens)
        unions: list[tuple[int, int]] = []  # (distinct experts, tokens) per verified layer
        if eng.scheduler is not None:
            count_unions(eng.scheduler, unions)  # (no local here holds the scheduler past the run)
        for _ in range(repeats):
            unions.clear()
            tokens = [ev.token for ev in eng.generate(prompt_ids, new_tokens, SamplingParams())]
            results.append(result_of(eng, policy, opts, tokens, unions, label))
    finally:
        eng.close()
        del eng
        # this run's memory goes before the next policy's loads: its tiers are cycles
        # (executors, hooks) the collector frees late, and the heap keeps freed blocks
        gc.collect()
        give_back_freed_memory()
    return sorted(results, key=lambda r: r.stats.seconds)[(len(results) - 1) // 2]


def count_unions(scheduler, unions: list[tuple[int, int]]) -> None:
    """Record each verified layer's (distinct experts, tokens) in ``unions``, beside what the
    scheduler records of it."""
    record = scheduler.on_verify_route

    def on_verify_route(layer, rows):
        if len(rows) > 1:
            unions.append((len({e for row in rows for e in row}), len(rows)))
        record(layer, rows)

    scheduler.on_verify_route = on_verify_route


def result_of(
    eng: Engine,
    policy: str,
    opts: EngineOptions,
    tokens: list[int],
    unions: list[tuple[int, int]],
    label: str | None,
) -> BenchResult:
    """The BenchResult of ``eng``'s last ``generate``."""
    s = eng.last_stats
    if label is None:
        label = policy
        if policy == "moespeq":
            label = f"moespeq{'+cpu' if eng.policy.host_compute else ''} k={opts.spec_depth}"
    budget = eng.budget if eng.plan.compute_tier == "device" else eng.plan.budget_bytes
    result = BenchResult(policy, label, budget, eng.cache.slots, eng.plan.draft_bytes, s, tokens)
    result.draft_released = eng.draft_released
    ivs = eng.backend.timeline.intervals
    computes = [iv for iv in ivs if iv.stream == "compute" and iv.kind == "compute"]
    uses = [
        (iv.layer, iv.expert)
        for iv in sorted(computes, key=lambda iv: iv.start)
        if iv.phase == "target" and iv.expert is not None
    ]
    plan = eng.plan
    resident = (
        spread(plan.slots, list(eng.ckpt.config.moe_layers), eng.ckpt.config.num_experts) if eng.policy.preload else []
    )
    result.fills_min = belady_misses(uses, eng.cache.slots, resident)
    fill_kind = "read" if plan.compute_tier == "host" else "copy"
    result.fills = sum(1 for iv in ivs if iv.kind == fill_kind)
    result.disk_bandwidth = eng.backend.disk_bandwidth() if plan.disk_tier and eng.backend.name != "mock" else None
    if result.disk_bandwidth is not None:
        result.disk_queue = queue_curve([iv for iv in ivs if iv.kind == "read"], eng.backend.reader.threads)
    result.regions = eng.backend.timeline.breakdown(s.seconds)
    result.target_compute_s = sum(iv.duration for iv in computes if iv.phase == "target")
    if eng.spec_stats is not None and eng.spec_stats.drafted:
        result.draft_token_s = sum(iv.duration for iv in computes if iv.phase == "draft") / eng.spec_stats.drafted
    if unions:  # the verifications' own k (a run's mean k counts its k = 0 cycles too)
        cfg = eng.ckpt.config
        result.mean_union = sum(u for u, _ in unions) / len(unions)
        bound = sum(min(cfg.num_experts, n * cfg.top_k) for _, n in unions) / len(unions)
        result.union_bound = round(bound)
    return result


def bench(
    path: Path,
    prompt_ids: list[int],
    new_tokens: int,
    policies: list[str],
    opts: EngineOptions,
    same_cache: bool = False,
    spec_depths: list[str] | None = None,
    moespeq_runs: list[tuple[str, bool | None]] | None = None,
) -> list[BenchResult]:
    """Run each policy (moespeq once per entry of ``spec_depths``, or per (spec depth,
    CPU experts) pair of ``moespeq_runs``); fill speedups. ``same_cache``: moespeq gets
    the draft's bytes (and its scratch) on top of the budget (``--vram``; ``--ram`` on the cpu backend) and
    no more full-precision slots than the baselines."""
    results = []
    context = opts.context or len(prompt_ids) + new_tokens
    budget_field = "ram" if opts.backend == "cpu" else "vram"
    for policy in policies:
        if policy == "moespeq":
            runs = moespeq_runs or [(k, opts.cpu_experts) for k in (spec_depths or [str(opts.spec_depth)])]
        else:
            runs = [(None, None)]
        for k, cpu in runs:
            o = opts
            if policy == "moespeq":
                o = replace(opts, spec_depth=k, cpu_experts=cpu)
                if same_cache:
                    # the draft and its grouped calls' scratch (runtime/executors/draft.py)
                    extra = (
                        draft_bytes_estimate(Checkpoint(path).config, opts.blocksize) + Engine(path, o).draft_scratch()
                    )
                    slots = baseline_slots(path, context, opts)
                    budget = int(getattr(opts, budget_field)) + extra
                    o = replace(o, **{budget_field: budget, "max_slots": slots})
            results.append(run_policy(path, prompt_ids, new_tokens, policy, o))
    by_policy = {r.policy: r for r in results if r.policy in BASELINES}
    for r in results:
        for b in BASELINES:
            base = by_policy.get(b)
            r.speedup_vs[b] = (base.stats.seconds / r.stats.seconds) if base and r.stats.seconds else None
    return results
