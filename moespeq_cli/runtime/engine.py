"""Engine: one model ready to generate on a backend.

``Engine(path, options)`` reads the checkpoint's config and tokenizer; ``load(context)``
plans device memory for that many tokens (refusing an impossible budget before reading
any weight), loads the non-expert weights, builds the expert store, cache and policy,
and instruments the model for the backend's clock. ``generate`` streams TokenEvents and
leaves ``last_stats``. The CLI, the benchmark and the tests all drive this class.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moespeq_cli.errors import UsageError
from moespeq_cli.fs import is_dir, shown
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.models.config import DTYPES
from moespeq_cli.models.loader import load_model
from moespeq_cli.runtime.backends import make_backend, resolve_backend_name
from moespeq_cli.runtime.generate import TokenEvent, generate
from moespeq_cli.runtime.planning.costs import host_expert_seconds
from moespeq_cli.runtime.planning.hardware import HardwareProfile, load_profile, parse_size
from moespeq_cli.runtime.planning.planner import Plan, checkpoint_plan
from moespeq_cli.runtime.sampling import SamplingParams
from moespeq_cli.runtime.scheduling.policies import make_policy
from moespeq_cli.runtime.scheduling.routing_trace import RoutingTrace
from moespeq_cli.runtime.stats import GenerationStats
from moespeq_cli.runtime.tiers.cache import CacheStats
from moespeq_cli.tokenizer import Tokenizer

DEFAULT_HARDWARE = "rtx3060-12gb"
DEFAULT_POLICY = "moespeq"


@dataclass
class EngineOptions:
    backend: str = "auto"
    dtype: str | None = None  # None: the checkpoint's torch_dtype
    cpu_threads: int | None = None
    hardware: str | None = None  # profile name or path; default rtx3060-12gb for mock
    vram: str | int | None = None  # device budget; default: the profile's usable memory
    policy: str = DEFAULT_POLICY
    draft: str = "auto"  # auto (saved draft if any, else quantize in memory) | PATH | none
    spec_depth: str | int = "auto"  # auto: the governor chooses k; N: fixed
    k_max: int = 8
    cpu_experts: bool | None = None  # None: the policy's default (on for moespeq and hybrid)
    max_slots: int | None = None  # cap on full-precision expert slots (bench's same-cache budget)
    quant_method: str = "nf4"
    blocksize: int = 64
    context: int | None = None  # tokens to allow and plan for (--context); None: what the run needs


class Engine:
    def __init__(self, path: Path, opts: EngineOptions | None = None):
        self.opts = opts = opts or EngineOptions()
        if opts.dtype is not None and opts.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {opts.dtype!r}; choose float32, float16 or bfloat16")
        self.policy = make_policy(opts.policy, opts.cpu_experts)  # an unknown policy lists the known ones
        self.backend_name = resolve_backend_name(opts.backend)
        self.hw: HardwareProfile | None = None
        self.budget: int | None = None
        if self.backend_name != "cpu":
            self.hw = load_profile(DEFAULT_HARDWARE if opts.hardware is None else opts.hardware)
            self.budget = parse_size(opts.vram, "--vram") if opts.vram is not None else self.hw.usable_memory
        elif opts.vram is not None or opts.hardware is not None:
            raise UsageError("--vram and --hardware apply to the mock and cuda backends, not --backend cpu")
        if opts.cpu_threads:
            torch.set_num_threads(opts.cpu_threads)
        self.fixed_k: int | None = None
        if str(opts.spec_depth) != "auto":
            try:
                self.fixed_k = int(opts.spec_depth)
            except ValueError:
                raise UsageError(f"--spec-depth must be auto or a number, got {opts.spec_depth!r}") from None
            if not 0 <= self.fixed_k <= 64:
                raise UsageError(f"--spec-depth {self.fixed_k} is out of range; use 0 to 64 or auto")
        if opts.draft not in ("auto", "none") and not is_dir(Path(opts.draft)):
            raise UsageError(f"--draft {shown(opts.draft)} is not a draft directory; build one with `moespeq quantize`")
        self.ckpt = Checkpoint(path)
        self.tokenizer = Tokenizer(self.ckpt.path, self.ckpt.raw_config)
        # storage_dtype: what the (real or simulated) device holds and what copies move;
        # dtype: what the numerics run in. On the CPU-numerics backends (cpu, mock) they run
        # in float32 unless --dtype says otherwise: a verification pass over k+1 tokens and
        # k+1 single-token passes then round alike, so speculative decoding gives plain
        # greedy decoding's tokens exactly (in bf16 a near-tie can flip; docs/design.md §6).
        self.storage_dtype = DTYPES[opts.dtype] if opts.dtype else self.ckpt.config.dtype
        cpu_numerics = self.backend_name in ("cpu", "mock")
        self.dtype = DTYPES[opts.dtype] if opts.dtype else (torch.float32 if cpu_numerics else self.storage_dtype)
        self.plan: Plan | None = None
        self.backend = None
        self.cache = None
        self.draft_exec = None
        self.scheduler = None
        self.draft_source: str | None = None
        self.last_stats: GenerationStats | None = None
        self.spec_stats = None
        self.draft_released = False
        self.draft_excess = 0  # draft device bytes beyond the plan's estimate

    def context_for(self, prompt_tokens: int, max_new_tokens: int, at_least: bool = False) -> int:
        """The context to plan for: ``--context`` or what the run needs. A run that would
        pass it, or the model's own limit, is refused here, before any weight is read."""
        limit, asked = self.ckpt.config.context_limit, self.opts.context
        needed = prompt_tokens + max_new_tokens
        n = f"at least {prompt_tokens}" if at_least else str(prompt_tokens)
        what = f"the prompt ({n} tokens) plus --max-new-tokens {max_new_tokens} needs {needed} tokens"
        if asked is not None and asked > limit:
            raise UsageError(
                f"--context {asked} is beyond the model's context of {limit} tokens; use --context {limit} or less"
            )
        if asked is not None and needed > asked:
            raise UsageError(
                f"{what}, more than --context {asked}; raise --context (up to the model's {limit}) "
                "or lower --max-new-tokens"
            )
        if needed > limit:
            raise UsageError(
                f"{what}, beyond the model's context of {limit} tokens; shorten the prompt or lower --max-new-tokens"
            )
        return asked or needed

    @property
    def policy_name(self) -> str | None:
        return None if self.backend_name == "cpu" else self.opts.policy

    def load(self, context: int) -> None:
        if self.backend_name == "cpu":
            from moespeq_cli.runtime.executors.experts import InMemoryExperts

            self.model = load_model(self.ckpt, self.dtype, context)
            self.model.set_experts(InMemoryExperts(self.ckpt, self.dtype))
            return
        from moespeq_cli.runtime.executors.instrument import instrument
        from moespeq_cli.runtime.executors.offload import OffloadedExperts
        from moespeq_cli.runtime.tiers.cache import ExpertCache
        from moespeq_cli.runtime.tiers.store import ExpertStore

        self.plan = checkpoint_plan(
            self.ckpt,
            context,
            self.budget,
            self.opts.policy,
            self.storage_dtype,
            blocksize=self.opts.blocksize,
            cpu_experts=self.policy.host_compute,
            with_draft=self.opts.draft != "none",
            max_slots=self.opts.max_slots,
        )
        backend = self.backend = make_backend(self.backend_name, self.hw, self.budget)
        backend.alloc(self.plan.non_expert_bytes, "non-expert weights")
        backend.alloc(self.plan.kv_cache_bytes, "KV cache")
        backend.alloc(self.plan.workspace_bytes, "workspace")
        model = load_model(self.ckpt, self.dtype, context)
        self.model = model.to(backend.device) if backend.name == "cuda" else model
        store = ExpertStore(self.ckpt, self.dtype, pin=backend.name == "cuda", storage_dtype=self.storage_dtype)
        self.cache = ExpertCache(store, backend, self.plan.slots)
        policy = self.policy
        self.target_exec = OffloadedExperts(self.model, self.cache, backend, policy)
        self.model.set_experts(self.target_exec)
        if policy.preload:
            self.cache.preload_all()
        if policy.speculative:
            self._setup_speculation()
        self.hooks = instrument(self.model, backend, self.storage_dtype)
        backend.reset_clock()

    def _setup_speculation(self) -> None:
        from moespeq_cli.runtime.executors.draft import DraftExperts
        from moespeq_cli.runtime.planning.costs import elem_size, transfer_seconds
        from moespeq_cli.runtime.planning.planner import spread
        from moespeq_cli.runtime.scheduling.elb import ElbScheduler
        from moespeq_cli.runtime.scheduling.governor import Governor, GovernorState

        c = self.ckpt.config
        plan = self.plan
        if plan.has_draft and self.opts.draft != "none":
            quant = self.load_draft()
            on_device = spread(plan.draft_device_experts, list(c.moe_layers), c.num_experts)
            device_bytes = quant.bytes_per_expert * len(on_device)
            self.draft_excess = max(0, device_bytes - plan.draft_bytes)
            self.backend.alloc(self.draft_excess, "4-bit draft experts")
            self.draft_exec = DraftExperts(
                quant.to(self.backend.device, on_device), self.backend, set(on_device), elem_size(self.storage_dtype)
            )
        t_copy = transfer_seconds(plan.expert_bytes, self.hw)
        t_host = None
        if self.policy.host_compute:
            target = self.target_exec

            def t_host(tokens: int) -> float:
                cost, act = target.host_cost(max(1, round(tokens)))
                return host_expert_seconds(cost, act, self.hw)

        state = GovernorState(self.opts.k_max, c.num_experts, c.top_k, t_copy, t_host=t_host)
        state.slots, state.total_experts = self.cache.slots, plan.total_experts
        if self.draft_exec is not None and self.draft_exec.on_device:
            state.spare_slots = self.spare_slots()
        if state.spare_slots and self.fixed_k is None:  # only the auto governor releases
            self.target_exec.trace = RoutingTrace(
                list(c.moe_layers),
                c.num_experts,
                c.top_k,
                self.cache.slots + state.spare_slots,
                list(self.cache.slot_of),
            )
            state.release_misses = self.release_misses
        self.governor = Governor(state, fixed=self.fixed_k)
        self.scheduler = ElbScheduler(self.model, self.cache, self.backend, self.target_exec, self.governor)
        self.scheduler.on_release = self.release_draft

    def spare_slots(self) -> int:
        """Full-precision slots the draft's device memory (and what is left) would hold."""
        free = self.backend.capacity - self.backend.used + self.draft_excess
        cap = self.plan.total_experts if self.opts.max_slots is None else self.opts.max_slots
        return int(max(0, min(cap - self.cache.slots, free // self.plan.expert_bytes)))

    def release_fill(self, n: int) -> list:
        """With CPU experts, the experts the slots gained at release take: the most
        routed so far that are not resident (a miss served on the CPU is never copied,
        so what the new slots hold is decided once)."""
        return self.target_exec.trace.most_routed(n, set(self.cache.slot_of))

    def release_misses(self) -> tuple[float, float] | None:
        """Expected misses per token of plain decoding (now, with the draft released),
        from every token the target has routed (``RoutingTrace``): with CPU experts the
        resident set stays put, without them it is LRU."""
        trace, slots, extra = self.target_exec.trace, self.cache.slots, self.governor.state.spare_slots
        if trace is None or not trace.tokens:
            return None
        if self.policy.host_compute:
            resident = set(self.cache.slot_of)
            return trace.static_misses(resident), trace.static_misses(resident | set(self.release_fill(extra)))
        return trace.lru_misses(slots), trace.lru_misses(slots + extra)

    def release_draft(self) -> None:
        """The governor found k = 0 with a bigger cache faster than any speculation: the
        draft's experts leave the device and their memory becomes expert slots."""
        d = self.draft_exec
        extra = self.spare_slots()
        d.quant.to(torch.device("cpu"), d.on_device)
        d.on_device = set()
        self.backend.free(self.draft_excess, "4-bit draft experts")
        self.draft_excess = 0
        fill = self.release_fill(extra) if self.policy.host_compute and self.target_exec.trace else []
        self.cache.grow(extra)
        for key in fill:
            self.cache.load(key, prefetch=True)
        if self.policy.host_compute:  # misses served on the CPU would leave the new slots empty
            self.cache.fill(prefetch=True)
        self.target_exec.trace = None
        self.governor.state.slots = self.cache.slots
        self.draft_released = True

    def load_draft(self):
        from moespeq_cli.quant.draft import QuantizedExperts, default_draft_dir

        if self.opts.draft not in ("auto", "none"):
            self.draft_source = str(self.opts.draft)
            return QuantizedExperts.load(Path(self.opts.draft), self.ckpt, self.dtype)
        saved = default_draft_dir(self.ckpt.path, self.opts.quant_method, self.opts.blocksize)
        if (saved / "manifest.json").is_file():
            self.draft_source = str(saved)
            return QuantizedExperts.load(saved, self.ckpt, self.dtype)
        self.draft_source = "quantized in memory"
        return QuantizedExperts.quantize(self.ckpt, self.opts.quant_method, self.opts.blocksize, self.dtype)

    def set_draft(self, executor) -> None:
        """Replace the draft's expert executor (tests: the target as its own draft)."""
        self.draft_exec = executor

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams) -> Iterator[TokenEvent]:
        if self.backend is None:
            clock, kind = time.perf_counter, "wall"
        else:
            self.backend.reset_clock()
            clock, kind = self.backend.now, self.backend.clock_kind
        times = []
        spec = None
        if self.scheduler is not None:
            from moespeq_cli.runtime.speculative import SpecStats, speculative_generate

            spec = self.spec_stats = SpecStats()
            self.governor.history.clear()
            events = speculative_generate(
                self.model,
                self.target_exec,
                self.draft_exec,
                prompt_ids,
                max_new_tokens,
                sampling,
                self.tokenizer.eos_ids,
                clock,
                self.governor.choose,
                self.scheduler,
                spec,
            )
        else:
            events = generate(self.model, prompt_ids, max_new_tokens, sampling, self.tokenizer.eos_ids, clock)
        try:
            for ev in events:
                times.append(ev.seconds)
                if ev.index == 0 and self.cache is not None:
                    # Hit rates and prefetch figures are about decoding (verification), not the
                    # prompt's prefill, whose experts are cold for every policy.
                    self.cache.stats = CacheStats()
                yield ev
        finally:  # also on Ctrl-C or an early close: the statistics of what was generated
            self.last_stats = self._finish_stats(kind, times, spec)

    def _finish_stats(self, kind: str, times: list[float], spec) -> GenerationStats:
        stats = GenerationStats.from_times(kind, times)
        if self.backend is not None:
            self.fill_offload_stats(stats)
        if spec is not None:
            stats.acceptance_rate = spec.acceptance_rate
            stats.mean_accepted = spec.mean_accepted
            stats.spec_depth_mean = spec.spec_depth_mean
            stats.draft_routing_match = self.scheduler.draft_routing_match
        self.spec_stats = spec
        return stats

    def fill_offload_stats(self, stats: GenerationStats) -> None:
        b, cs = self.backend, self.cache.stats
        b.finalize_timeline()
        stats.expert_hit_rate = cs.hit_rate
        stats.prefetch_precision = cs.prefetch_precision
        stats.prefetch_recall = cs.prefetch_recall
        stats.io_stall_s = b.io_stall_s
        stats.bytes_h2d = b.bytes_h2d
        if self.policy.host_compute:
            stats.cpu_expert_share = cs.host_computed / cs.lookups if cs.lookups else None
        # The lower bound: the target's own compute on the GPU (drafting is overhead, not a
        # floor), or moving every expert used beyond the slots at the link's rate (plus the
        # CPU's rate for one expert at a time, where experts may run there).
        ivs = b.timeline.intervals
        compute = sum(
            iv.duration for iv in ivs if iv.stream == "compute" and iv.kind == "compute" and iv.phase == "target"
        )
        used = {(iv.layer, iv.expert) for iv in ivs if iv.kind == "compute" and iv.expert is not None}
        rate = self.hw.link_bandwidth / self.plan.expert_bytes
        if self.policy.host_compute:
            rate += 1.0 / host_expert_seconds(*self.target_exec.host_cost(1), self.hw)
        bound = max(compute, max(0, len(used) - self.plan.slots) / rate)
        stats.bound_ratio = stats.seconds / bound if bound > 0 and stats.seconds else None
