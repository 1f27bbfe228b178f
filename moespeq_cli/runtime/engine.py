"""Engine: one model ready to generate on a backend.

``Engine(path, options)`` reads the checkpoint's config and tokenizer; ``load(context)``
plans memory for that many tokens (refusing an impossible budget before reading any
weight), loads the non-expert weights, builds the memory tiers (tiers/hierarchy.py), the
executor and the policy (and for moespeq its ``Speculation``), and instruments the model
for the backend's clock. ``generate`` streams TokenEvents and leaves ``last_stats``. The
CLI, the benchmark and the tests all drive this class; it wires, the pieces decide.

Backends: ``mock`` and ``cuda`` offload to a device (``--vram``), with host RAM (``--ram``)
above the disk; ``cpu`` is the plain reference when every expert fits in ``--ram`` (the
default: the memory the machine has available), and otherwise offloads for real with
RAM as the compute tier and the disk as the link, on the wall clock.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from moespeq_cli.errors import UsageError
from moespeq_cli.fs import is_dir, shown
from moespeq_cli.models.base import fuse_attention_projections
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.models.config import DTYPES
from moespeq_cli.models.loader import load_model
from moespeq_cli.runtime.backends import library_bytes, make_backend, resolve_backend_name
from moespeq_cli.runtime.executors.grouped import grouped_scratch_bytes
from moespeq_cli.runtime.generate import TokenEvent, generate
from moespeq_cli.runtime.planning.hardware import HardwareProfile, format_size, load_profile, parse_size
from moespeq_cli.runtime.planning.planner import (
    DEFAULT_DEPTH,
    Plan,
    beyond_memory,
    checkpoint_plan,
    default_ram,
    host_tier_ram,
)
from moespeq_cli.runtime.sampling import SamplingParams
from moespeq_cli.runtime.scheduling.policies import make_policy
from moespeq_cli.runtime.stats import GenerationStats, fill_offload_stats
from moespeq_cli.tokenizer import Tokenizer

DEFAULT_HARDWARE = "rtx3060-12gb"
DEFAULT_POLICY = "moespeq"


@dataclass
class EngineOptions:
    backend: str = "auto"
    dtype: str | None = None  # None: the checkpoint's torch_dtype
    cpu_threads: int | None = None
    hardware: str | HardwareProfile | None = None  # profile name, path or profile; default rtx3060-12gb

    vram: str | int | None = None  # device budget; default: the profile's usable memory
    policy: str = DEFAULT_POLICY
    draft: str = "auto"  # auto (saved draft if any, else quantize in memory) | PATH | none
    spec_depth: str | int = "auto"  # auto: the governor chooses k; N: fixed
    # decide before loading whether the draft can pay for its memory at all (planning/estimate.py
    # speculation_cannot_pay); False leaves that verdict to the governor at run time (whether the
    # draft's grouped calls are worth their scratch is decided by the plan either way)
    draft_verdict: bool = True
    k_max: int = DEFAULT_DEPTH
    cpu_experts: bool | None = None  # None: the policy's default (on for moespeq and hybrid)
    ram: str | int | None = None  # host RAM for expert buffers; default: what the machine has available
    io_threads: int = 4  # disk reader threads
    max_slots: int | None = None  # cap on full-precision expert slots (bench's same-cache budget)
    quant_method: str = "nf4"
    blocksize: int = 64
    context: int | None = None  # tokens to allow and plan for (--context); None: what the run needs


def four_bit_already(option: str, fmt) -> str:
    return (
        f"{option}: this model's experts are stored 4-bit already ({fmt.quant}), so it runs without a 4-bit draft "
        "(speculation off); drop the option"
    )


def refuse_depth_without_draft(option: str, draft: str, fmt) -> None:
    """A fixed speculation depth (``option``: run's --spec-depth, bench's --spec-depths)
    needs the 4-bit draft: refused with --draft none, or where the experts are 4-bit
    already (``fmt``: the checkpoint's expert format)."""
    if draft == "none":
        raise UsageError(f"{option} speculates with the draft, and --draft none leaves it out; drop one")
    if fmt.four_bit:
        raise UsageError(four_bit_already(option, fmt))


def cpu_profile_takes_no_vram(hw: HardwareProfile, remedy: str = "drop --vram") -> str:
    """The refusal of --vram with a profile of ``kind: cpu`` (run, plan)."""
    return (
        f"hardware profile {hw.called} describes a CPU (kind: cpu): it simulates --backend cpu on the mock, where "
        f"--ram is the budget; {remedy}"
    )


class Engine:
    def __init__(self, path: Path, opts: EngineOptions | None = None):
        self.opts = opts = opts or EngineOptions()
        if opts.dtype is not None and opts.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {opts.dtype!r}; choose float32, float16 or bfloat16")
        self.backend_name = resolve_backend_name(opts.backend)
        cpu = self.backend_name == "cpu"
        self.hw: HardwareProfile | None = None
        self.budget: int | None = None
        self._step_models: dict = {}  # context -> step_model's pair (built once for both verdicts)
        if not cpu:
            if opts.hardware is None and self.backend_name == "cuda":
                from moespeq_cli.runtime.planning.calibrate import cached_gpu_profile

                self.hw = cached_gpu_profile()  # this GPU, measured once and cached (not an RTX 3060 assumed)
            else:
                hw = DEFAULT_HARDWARE if opts.hardware is None else opts.hardware
                self.hw = hw if isinstance(hw, HardwareProfile) else load_profile(hw)

            if self.hw.kind == "cpu" and (opts.vram is not None or self.backend_name == "cuda"):
                raise UsageError(cpu_profile_takes_no_vram(self.hw, "drop --vram (and --backend cuda)"))
            self.budget = parse_size(opts.vram, "--vram") if opts.vram is not None else self.hw.usable_memory
        elif opts.vram is not None or opts.hardware is not None:
            raise UsageError("--vram and --hardware apply to the mock and cuda backends, not --backend cpu (use --ram)")
        # the device the run computes on, really or simulated: a GPU, or this CPU (the cpu
        # backend; the mock with a cpu profile, which simulates it), and what it computes in
        self.device_type = "cpu" if cpu or self.hw.kind == "cpu" else "cuda"
        if self.device_type == "cpu" and opts.cpu_experts:
            raise UsageError(
                "--cpu-experts needs a device beside the CPU; with --backend cpu (or a cpu profile) every expert "
                "runs on the CPU"
            )
        # an unknown policy lists the known ones; with no device beside the CPU there is nothing to pair it with
        cpu_device = self.device_type == "cpu" and opts.policy == "moespeq"
        self.policy = make_policy(opts.policy, False if cpu_device else opts.cpu_experts)
        self.ram = parse_size(opts.ram, "--ram") if opts.ram is not None else None
        self.threads_note: str | None = None
        self.kernels_note: str | None = None
        self._threads_before: int | None = None  # torch's thread count, put back at close
        if opts.cpu_threads:
            torch.set_num_threads(opts.cpu_threads)
        elif self.backend_name == "cuda" and self.policy.host_compute:
            # experts computed on the host while a GPU computes: the Python thread that
            # launches the GPU's kernels keeps a core of its own
            n = max(1, (os.cpu_count() or 2) - 1)
            torch.set_num_threads(n)
            self.threads_note = (
                f"CPU experts on {n} threads, one core left to launch GPU work (--cpu-threads to change)"
            )
        self.fixed_k: int | None = None
        if str(opts.spec_depth) != "auto":
            try:
                self.fixed_k = int(opts.spec_depth)
            except ValueError:
                raise UsageError(f"--spec-depth must be auto or a number, got {opts.spec_depth!r}") from None
            if not 0 <= self.fixed_k <= 64:
                raise UsageError(f"--spec-depth {self.fixed_k} is out of range; use 0 to 64 or auto")
        given_draft = opts.draft not in ("auto", "none")
        if given_draft and not is_dir(Path(opts.draft)):
            what = "does not exist" if not os.path.lexists(opts.draft) else "is not a draft directory"
            raise UsageError(f"--draft {shown(opts.draft)} {what}; build one with `moespeq quantize`")
        self.ckpt = Checkpoint(path)
        self.adopt_saved_draft()
        fmt = self.ckpt.config.expert_format
        if given_draft and fmt.four_bit:
            raise UsageError(four_bit_already("--draft", fmt))
        if self.fixed_k:
            refuse_depth_without_draft(f"--spec-depth {self.fixed_k}", opts.draft, fmt)
        from moespeq_cli.quant.draft_store import holds_draft_files

        # (a damaged draft, its files without a manifest, gets through: loading it says so)
        if given_draft and not holds_draft_files(Path(opts.draft)):
            raise UsageError(f"--draft {shown(opts.draft)} is not a draft directory; build one with `moespeq quantize`")
        self.tokenizer = Tokenizer(self.ckpt.path, self.ckpt.raw_config)
        # storage_dtype: what every memory tier holds and what transfers move (the
        # checkpoint's); dtype: what the numerics run in. On the CPU-numerics backends (cpu,
        # mock) they run in float32 unless --dtype says otherwise: a verification pass over
        # k+1 tokens and k+1 single-token passes then round alike, so speculative decoding
        # gives plain greedy decoding's tokens exactly (in bf16 a near-tie can flip;
        # docs/design.md §6). Experts are widened as they are used, never held twice.
        self.storage_dtype = DTYPES[opts.dtype] if opts.dtype else self.ckpt.config.dtype
        self.dtype = (
            DTYPES[opts.dtype]
            if opts.dtype
            else (torch.float32 if cpu or self.backend_name == "mock" else self.storage_dtype)
        )
        self.device_dtype = self.dtype if self.device_type == "cpu" else self.storage_dtype  # what it computes in
        # Where this CPU really computes (the cpu backend; cuda's CPU experts), moespeq's CPU
        # kernels do it (kernels/): weights stay in the checkpoint's dtype (a bf16 expert is
        # not widened to float32 in RAM), activations and accumulation are float32, and a
        # row's result does not depend on the batch, so speculative decoding stays exact.
        from moespeq_cli import kernels

        self.cpu_kernels = (
            self.backend_name == "cuda" or (cpu and self.dtype == torch.float32)
        ) and kernels.available()
        wanted = (self.backend_name == "cuda" and self.policy.host_compute) or (cpu and self.dtype == torch.float32)
        why = kernels.why_unavailable() if wanted else None  # (asking builds them: only where they would run)
        if why and "MOESPEQ_KERNELS" not in why:  # said once: decoding is several times slower
            self.kernels_note = f"CPU kernels unavailable ({why}): computing with torch, slower"
        if cpu and self.cpu_kernels:
            kernels.claim_threads()
        if cpu and self.cpu_kernels and self.storage_dtype == torch.float32 and opts.dtype:
            self.storage_dtype = self.ckpt.config.dtype  # --dtype float32: the numerics, not a widened copy
        self.host_dtype = self.storage_dtype if cpu and self.cpu_kernels else self.dtype  # what RAM holds on cpu
        # the dense layers' weights on the compute device, real or simulated: on this CPU with
        # the kernels, the checkpoint's dtype (a mock with a cpu profile prices what the cpu
        # backend would run)
        kernels_here = self.device_type == "cpu" and self.dtype == torch.float32 and kernels.available()
        self.dense_dtype = self.ckpt.config.dtype if kernels_here else self.device_dtype
        if self.backend_name == "mock" and not opts.cpu_threads:
            # the simulator's own arithmetic (its clock is virtual) on one thread, until close:
            # torch's threads spin at each op's barrier, and one other busy process on a
            # 2-core machine made the demo's 300 tokens take 15.3 s instead of 3.4 (one
            # thread: 3.7 busy, 3.5 idle). (Set after the kernels' check above: a mock of a CPU
            # that loads them sizes their pool, once a process, from the machine's threads.)
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        self.plan: Plan | None = None
        self.backend = None
        self.hooks: list = []  # the model's cost hooks (``instrument``), taken off at close
        self.tiers = None
        self.cache = None
        self.target_exec = None
        self.spec = None
        self.draft_source: str | None = None
        self.draft_note: str | None = None  # why the saved draft was not used, for the user
        self.ram_note: str | None = None  # a --ram beyond this machine's memory
        self.last_stats: GenerationStats | None = None
        self.spec_stats = None
        self._kept = None  # (cache, the token ids it holds) after a generate(reuse=True)
        self.reused_tokens = 0  # prompt tokens the last generate() did not prefill again

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
        """None for the plain cpu reference (no policy applies)."""
        return None if self.backend_name == "cpu" and self.backend is None else self.opts.policy

    # -- planning -------------------------------------------------------------
    def ignored_options(self) -> str | None:
        """With no plan (every expert in RAM on the cpu backend), the offloading options
        given that then do nothing, named in one line; None if none was given."""
        o = self.opts
        # (resident: every expert in RAM, which is what runs)
        asked = [f"--policy {o.policy}"] if o.policy not in (DEFAULT_POLICY, "resident") else []
        asked += [f"--spec-depth {o.spec_depth}"] if str(o.spec_depth) != "auto" else []
        asked += [f"--draft {o.draft}"] if o.draft != "auto" else []
        if not asked:
            return None
        return (
            f"every expert fits in RAM, so --backend cpu decodes from memory without offloading or a draft: "
            f"{' and '.join(asked)} {'take' if len(asked) > 1 else 'takes'} effect with --ram below the experts' size"
        )

    @property
    def wants_draft(self) -> bool:
        """Whether a draft is placed: not with ``--draft none``, nor at ``--spec-depth 0``
        (never drafting: its memory holds experts)."""
        return self.opts.draft != "none" and self.fixed_k != 0

    def make_plan(self, context: int) -> Plan | None:
        """The memory plan for ``context`` tokens (None: the plain cpu reference). Refuses an
        impossible budget before any weight is read."""
        kw = dict(
            blocksize=self.opts.blocksize,
            cpu_experts=self.policy.host_compute,
            with_draft=self.wants_draft,
            max_slots=self.opts.max_slots,
            depth=self.opts.k_max if self.fixed_k is None else self.fixed_k,
        )
        if self.device_type == "cpu":
            # unbounded, the sizes: the dense weights as the CPU holds them (plan prices the same)
            fixed = checkpoint_plan(self.ckpt, context, dtype=self.dense_dtype)
            ram, source = host_tier_ram(fixed, self.ram)
            if self.policy.name == "hybrid":  # (whatever --ram is: not a note that --ram would change it)
                raise UsageError(
                    "policy hybrid computes experts on the CPU beside a GPU; with --backend cpu or a CPU's profile "
                    "every expert already runs on the CPU: choose moespeq, gate-prefetch, lru or ondemand"
                )
            if self.backend_name == "cpu" and ram >= fixed.all_experts_ram_bytes:
                return None  # every expert fits (page by page, as RAM slots hold them): the plain reference
            return checkpoint_plan(
                self.ckpt,
                context,
                ram,
                self.opts.policy,
                self.storage_dtype,
                compute_tier="host",
                ram_source=source,
                **kw,
            )
        ram, source = self.ram, None
        if ram is None:
            ram, source = default_ram()
        kw["library_bytes"] = library_bytes(self.backend_name, self.hw)  # cuBLAS's workspaces: the budget holds them
        kw["grouped_scratch"] = grouped_scratch_bytes(self.hw, self.ckpt.config, self.storage_dtype, context)
        kw["draft_scratch"] = self.draft_scratch()
        plan = checkpoint_plan(
            self.ckpt, context, self.budget, self.opts.policy, self.storage_dtype, ram=ram, ram_source=source, **kw
        )
        if plan.draft_scratch_bytes:
            plan = self.scratch_verdict(plan, context, dict(kw, ram=ram, ram_source=source))
        if plan.has_draft and self.fixed_k is None and self.opts.draft == "auto" and self.opts.draft_verdict:
            plan = self.draft_verdict(plan, context, dict(kw, ram=ram, ram_source=source))
        if (
            plan.disk_tier
            and (self.hw.disk_bandwidth is None or self.hw.disk_latency is None)
            and self.backend_name == "mock"
        ):
            raise UsageError(
                f"the experts do not all fit in --ram {format_size(ram)}, and hardware profile {self.hw.called} has no "
                "disk_bandwidth / disk_latency to time the disk tier with; add them to the profile or raise --ram"
            )
        return plan

    def draft_scratch(self) -> int:
        """Device memory the draft's grouped calls take besides its experts, on this run's
        hardware (runtime/executors/draft.py ``draft_scratch_bytes``; 0 without a draft)."""
        if not self.policy.speculative or not self.wants_draft or self.device_type != "cuda":
            return 0
        from moespeq_cli.runtime.executors.draft import draft_scratch_bytes

        return draft_scratch_bytes(self.hw, self.ckpt.config, self.opts.blocksize, self.storage_dtype)

    def step_model(self, context: int):
        """(the model on the meta device, the cost model of its decode step on this run's
        hardware), built once a context (the scratch and draft verdicts both price plans)."""
        from moespeq_cli.models import build_model
        from moespeq_cli.runtime.planning.estimate import StepModel

        if context not in self._step_models:
            model = build_model(self.ckpt.arch, self.ckpt.raw_config, context, str(self.ckpt.path / "config.json"))
            step = StepModel(model, self.ckpt.config, self.hw, self.storage_dtype, context)
            step.draft_blocksize = self.opts.blocksize
            self._step_models[context] = model, step
        return self._step_models[context]

    def scratch_verdict(self, plan: Plan, context: int, kw: dict) -> Plan:
        """``plan`` (with the draft's grouped calls' scratch), or the plan without it where by
        the cost model those slots are worth more (planning/estimate.py ``scratch_verdict``)."""
        from moespeq_cli.runtime.planning.estimate import scratch_verdict
        from moespeq_cli.runtime.planning.planner import make_plan

        model, step = self.step_model(context)
        apart = make_plan(
            model,
            self.ckpt.config,
            self.storage_dtype,
            self.budget,
            context,
            self.opts.policy,
            **dict(kw, draft_scratch=0),
        )
        try:
            return scratch_verdict(step, plan, apart, depth=self.fixed_k)
        except UsageError:  # a profile without disk figures cannot price the disk tier: keep the scratch
            return plan

    def draft_verdict(self, plan: Plan, context: int, kw: dict) -> Plan:
        """``plan``, or the plan without the draft when by the cost model its memory is
        worth more as expert slots than speculation could earn even if every drafted token
        were accepted (planning/estimate.py ``speculation_cannot_pay``). The governor would
        come to the same verdict at run time, but only after a prefill with fewer slots and
        the cycles that measure it (docs/governor.md); ``--spec-depth N`` keeps the draft."""
        from moespeq_cli.runtime.planning.estimate import speculation_cannot_pay
        from moespeq_cli.runtime.planning.planner import make_plan

        model, step = self.step_model(context)
        cfg, dtype = self.ckpt.config, self.storage_dtype
        released = make_plan(model, cfg, dtype, self.budget, context, self.opts.policy, **dict(kw, with_draft=False))
        try:
            return speculation_cannot_pay(step, plan, released) or plan
        except UsageError:  # a profile without disk figures cannot price the disk tier: the governor decides
            return plan

    # -- loading --------------------------------------------------------------
    def load(self, context: int, plan: Plan | None | bool = False) -> None:
        """Load for ``context`` tokens with ``plan`` (default: ``make_plan(context)``)."""
        self.plan = plan = self.make_plan(context) if plan is False else plan
        self.ram_note = self.ram_beyond_memory(plan, context)  # before any weight takes the memory it measures
        if plan is None:
            from moespeq_cli.runtime.executors.experts import InMemoryExperts

            ck = self.cpu_kernels
            self.model = load_model(self.ckpt, self.dtype, context, cpu_kernels=ck)
            self.model.set_experts(InMemoryExperts(self.ckpt, self.host_dtype, fast=ck))
            return
        from moespeq_cli.runtime.executors.instrument import instrument
        from moespeq_cli.runtime.executors.offload import OffloadedExperts
        from moespeq_cli.runtime.tiers.disk import DiskReader
        from moespeq_cli.runtime.tiers.hierarchy import ExpertTiers

        reader = DiskReader(threads=self.opts.io_threads)
        backend = self.backend = make_backend(self.backend_name, self.hw, plan.budget_bytes, reader)
        if backend.name == "mock":  # its casts are the simulation's only where it widens the GPU's dtype
            backend.counter.skip_casts = backend.counter.skip_casts and self.dtype != self.storage_dtype
        if plan.compute_tier == "device":
            backend.alloc(plan.non_expert_bytes, "non-expert weights")
            backend.alloc(plan.kv_cache_bytes, "KV cache")
            backend.alloc(plan.workspace_bytes, "workspace")
        backend.alloc(plan.slot_bytes, "expert slots")
        model = load_model(self.ckpt, self.dtype, context, cpu_kernels=self.cpu_kernels and backend.name == "cpu")
        self.model = model.to(backend.device) if backend.name == "cuda" else model
        if plan.compute_tier == "device" or backend.name == "mock":  # the mock of a cpu: as its kernels run it
            fuse_attention_projections(self.model)
            if plan.compute_tier == "device" and self.hw.kind != "cpu":
                # gate-prefetch's guess from each router's own product; every policy routes
                # from that product, so all of them route alike to the bit
                self.model.pair_routers()
            if backend.name == "cuda":  # the unfused blocks, freed, are too small to reuse
                torch.cuda.empty_cache()
        if backend.name == "mock":
            from moespeq_cli.kernels.modules import one_call_attention

            layers = self.model.model.layers
            backend.one_call_attention = {i for i, lay in enumerate(layers) if one_call_attention(lay.attn)}
        self.tiers = tiers = ExpertTiers(self.ckpt, plan, backend)
        self.cache = tiers.compute
        self.target_exec = OffloadedExperts(
            self.model,
            tiers,
            backend,
            self.policy,
            self.device_dtype,
            self.dtype,
            self.cpu_kernels,
            grouped=plan.compute_tier == "device",
        )

        self.model.set_experts(self.target_exec)
        if self.policy.preload:
            tiers.preload()
        else:
            tiers.preload_host()
        if self.policy.speculative:
            from moespeq_cli.runtime.scheduling.speculation import Speculation

            quant = self.load_draft() if plan.has_draft and self.wants_draft else None
            self.spec = Speculation(
                self.model,
                plan,
                backend,
                tiers,
                self.target_exec,
                quant,
                self.fixed_k,
                max(self.opts.k_max, self.fixed_k or 0),  # a fixed depth past the governor's range is the run's
                self.opts.max_slots,
                torch.empty(0, dtype=self.storage_dtype).element_size(),
                self.device_type,
                self.device_dtype,
                self.dtype,
            )
        self.hooks = instrument(self.model, backend, self.device_dtype, self.dense_dtype)
        backend.reset_clock()

    def adopt_saved_draft(self) -> None:
        """``--draft auto`` with the default method and block size, where `moespeq quantize`
        saved this checkpoint's draft only with others (``quantize --method fp4 --blocksize
        128``): that draft is the one to load, and the plan must size it (it was quantized
        again in memory, with the defaults, on every run)."""
        from moespeq_cli.quant.draft_store import draft_options

        o = self.opts
        defaults = (EngineOptions.quant_method, EngineOptions.blocksize)
        if (
            not self.policy.speculative  # no draft to load: no drafts to look for
            or o.draft != "auto"
            or (o.quant_method, o.blocksize) != defaults
            or self.ckpt.config.expert_format.four_bit
        ):
            return
        method, blocksize = draft_options(self.ckpt, *defaults)
        self.opts = replace(o, quant_method=method, blocksize=blocksize)

    def load_draft(self):
        from moespeq_cli.quant.draft import QuantizedExperts
        from moespeq_cli.quant.draft_store import saved_draft, stale_draft

        if self.opts.draft not in ("auto", "none"):
            self.draft_source = str(self.opts.draft)
            return QuantizedExperts.load(Path(self.opts.draft), self.ckpt, self.dtype)
        saved = saved_draft(self.ckpt.path, self.opts.quant_method, self.opts.blocksize)
        # a draft of other weights: not asked for by name, so not a failure (said, and rebuilt in memory)
        self.draft_note = stale_draft(saved, self.ckpt) if saved is not None else None
        if saved is not None and self.draft_note is None:
            self.draft_source = str(saved)
            return QuantizedExperts.load(saved, self.ckpt, self.dtype)
        self.draft_source = "quantized in memory"
        return QuantizedExperts.quantize(self.ckpt, self.opts.quant_method, self.opts.blocksize, self.dtype)

    def close(self) -> None:
        """Stop the backend's threads (the disk reader's) and take the model's cost hooks
        off (they hold the backend). Safe to call twice."""
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        if self.backend is not None:
            self.backend.close()

    # -- speculation, for the CLI, the benchmark and the tests -------------------
    @property
    def scheduler(self):
        return self.spec.scheduler if self.spec is not None else None

    @property
    def governor(self):
        return self.spec.governor if self.spec is not None else None

    @property
    def draft_exec(self):
        return self.spec.draft if self.spec is not None else None

    def ram_beyond_memory(self, plan: Plan | None, context: int) -> str | None:
        """A note when a given --ram lets experts take more RAM than the machine has
        available (planner.py ``beyond_memory``): the plan's RAM buffers, or on the cpu
        backend with every expert fitting, all of them."""
        if self.ram is None:
            return None
        if plan is None:
            sizes = checkpoint_plan(self.ckpt, context, dtype=self.dense_dtype)
            return beyond_memory(self.ram, sizes.all_experts_ram_bytes)
        return beyond_memory(self.ram, plan.ram_held_bytes)

    @property
    def budget_note(self) -> str | None:
        """A note when --vram is more than the profile's device holds (hardware.py
        ``beyond_device``): said by the plan line, ``run --json``, ``bench`` and the report."""
        from moespeq_cli.runtime.planning.hardware import beyond_device

        return beyond_device(self.budget, self.hw) if self.hw is not None and self.budget is not None else None

    @property
    def plan_note(self) -> str | None:
        """What the plan line adds about this machine's CPU (its threads, its kernels)."""
        return "; ".join(n for n in (self.threads_note, self.kernels_note) if n) or None

    @property
    def draft_released(self) -> bool:
        return self.spec is not None and self.spec.released

    def set_draft(self, executor) -> None:
        """Replace the draft's expert executor (tests: the target as its own draft)."""
        self.spec.draft = executor

    def spare_slots(self) -> int:
        return self.spec.spare_slots()

    def release_draft(self) -> None:
        self.spec.release_draft()

    # -- generating -------------------------------------------------------------
    def reusable_cache(self, prompt_ids: list[int]):
        """The previous call's cache cut to the longest prefix it shares with ``prompt_ids``
        (at least one token left to feed), or a new one when nothing can be reused (no
        previous call, nothing shared, or a linear-attention state not kept there)."""
        kept = self._kept
        self._kept = None
        if kept is not None:
            cache, ids = kept
            n = 0
            for a, b in zip(ids, prompt_ids[:-1], strict=False):
                if a != b:
                    break
                n += 1
            if n and cache.can_truncate(n):
                cache.truncate(n)
                cache.keep_from(None)
                return cache
        return self.model.new_cache()

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams, reuse: bool = False
    ) -> Iterator[TokenEvent]:
        """``reuse``: start from the previous ``reuse`` call's cache where its tokens are a
        prefix of ``prompt_ids`` (a conversation's earlier turns are not prefilled again);
        chat and serve use it. The prefill of the rest is a pass continuing the cache (a long
        one in parts, as a long prompt's), so the logits can differ from a whole prefill's in
        the last bits."""
        if reuse:
            cache = self.reusable_cache(prompt_ids)
            reused = cache.length
        else:
            self._kept, cache, reused = None, self.model.new_cache(), 0
        if self.backend is None:
            clock, kind, since = time.perf_counter, "wall", None
        else:  # token times count from the clock's reset, as the timeline's intervals do
            self.backend.reset_clock()
            clock, kind, since = self.backend.now, self.backend.clock_kind, 0.0
        times = []
        spec = None
        if self.spec is not None:
            from moespeq_cli.runtime.speculative import SpecStats, speculative_generate

            spec = self.spec_stats = SpecStats()
            self.governor.history.clear()
            events = speculative_generate(
                self.model,
                self.target_exec,
                self.spec.draft,
                prompt_ids,
                max_new_tokens,
                sampling,
                self.tokenizer.eos_ids,
                clock,
                self.spec.choose,
                self.scheduler,
                spec,
                cache,
                since,
            )
        else:
            events = generate(
                self.model, prompt_ids, max_new_tokens, sampling, self.tokenizer.eos_ids, clock, cache, since
            )
        self.reused_tokens = reused
        emitted: list[int] = []
        try:
            for ev in events:
                emitted.append(ev.token)
                times.append(ev.seconds)
                if ev.index == 0 and self.tiers is not None:
                    # Hit rates and prefetch figures are about decoding (verification), not the
                    # prompt's prefill, whose experts are cold for every policy.
                    self.tiers.reset_stats()
                if spec is None and self.backend is not None:
                    self.backend.resolve_stalls()  # the token was sampled: its events are done
                yield ev
        except GeneratorExit:  # closed at a token: every pass complete
            raise
        except BaseException:  # a pass ended by an exception (a read that failed, a signal inside it)
            self.recover()
            raise
        finally:  # also on Ctrl-C or an early close: the statistics of what was generated
            try:
                self.last_stats = self._finish_stats(kind, times, spec)
            except BaseException:  # (a signal while reads in flight land): the token times at least
                self.last_stats = GenerationStats.from_times(kind, times)
                raise
            if reuse:  # what the cache now holds, for the next call (after a pass cut short too: its
                # length did not advance, and ``reusable_cache`` takes it only where ``can_truncate``
                # finds every layer's state there: chat's Ctrl-C mid-answer does not prefill it all again)
                self._kept = (cache, (list(prompt_ids) + emitted)[: cache.length])

    def recover(self) -> None:
        """After a pass cut short (a read that failed, a file changed under it, Ctrl-C in a
        layer): what was in flight settles, and the expert tiers drop what it left half done
        (pins, failed fills, slots no expert holds), so that the next generation (serve's
        next request, chat's next turn) starts from a consistent state: the target's
        experts, not a draft cycle's, and the scheduler's per-cycle queues emptied."""
        try:
            if self.backend is not None:
                with contextlib.suppress(Exception):  # (the failure is the caller's to report)
                    self.backend.synchronize()
        finally:  # (a signal while it waits: the state mended all the same)
            if self.tiers is not None:
                self.tiers.recover()
            if self.backend is not None:
                self.backend.phase = "target"
            if self.scheduler is not None:
                self.scheduler.reset()
            if self.spec is not None:
                self.model.set_experts(self.target_exec)

    def _finish_stats(self, kind: str, times: list[float], spec) -> GenerationStats:
        stats = GenerationStats.from_times(kind, times)
        if self.backend is not None:
            self.backend.synchronize()
            fill_offload_stats(stats, self.backend, self.tiers, self.plan, self.target_exec)
        if spec is not None:
            stats.acceptance_rate = spec.acceptance_rate
            stats.mean_accepted = spec.mean_accepted
            stats.spec_depth_mean = spec.spec_depth_mean
            stats.draft_routing_match = self.scheduler.draft_routing_match
        self.spec_stats = spec
        return stats
