"""The analytic throughput model behind ``moespeq plan``: tokens/s per policy from the
model's shapes, a memory plan and a hardware profile, before any weight is downloaded.

It prices a decode step with the same roofline formulas the mock backend's clock uses
(costs.py; non-expert modules from ``instrument.charges``), the same measured host time
per region and per layer where the profile was calibrated (``region_overhead``), and adds
what each policy does with the experts that are not on the device. Routing is not known before running, so it
assumes what an honest estimate can: tokens pick their experts independently and
uniformly, a cache of S slots out of N experts hits with probability S / N, and n tokens
verified together need ``union_size(n)`` distinct experts per layer.

Per token (L MoE layers, top-k K, hit rate h, one expert: t_dev on the GPU, t_copy over
the link, t_cpu on the host; T_ne the non-expert compute):

    resident       T_ne + L K t_dev
    ondemand       T_ne + L K (t_copy + t_dev)            copied one by one, nothing kept
    lru            T_ne + L K t_dev + L K (1-h) t_copy     misses exposed
    gate-prefetch  L max(c, K (1-h) t_copy)     c = T_ne/L + K t_dev; perfect next-layer prediction
    hybrid         L (T_ne/L + max(K h t_dev, K (1-h) t_cpu))   GPU and CPU in parallel
    moespeq, k = 0 L (c + r / (1/t_copy + 1/t_cpu))   r = max(0, K (1-h) - c / t_copy): what the
                   prefetch cannot hide goes to the link and the CPU together
    moespeq        1 / max_k Theta(k) of the governor (governor.py), fed with these
                   times, a 4-bit draft (its experts on the device or the CPU per the
                   plan), a verification's copies hidden behind the draft only as
                   far as the plan's slots hold them ahead of it (the rest copied
                   when needed, exposed), an assumed per-position acceptance
                   (default 0.8); or,
                   when it is faster, k = 0 with the draft's memory as slots -- what the
                   governor switches to at run time (``plan_moespeq``)

With a disk tier (``--ram`` below the experts' size) an expert missing from the device
is also missing from RAM with probability ``p_read = 1 - (H - S) / (N - S)`` (H experts
in RAM, S on the device, N in all: RAM keeps what it read for a copy, so it holds the
device's experts too), or ``1 - H / (N - S)`` with CPU experts (``hybrid``, moespeq's
k = 0 arm: the device's set is placed once and RAM, an LRU, keeps only the others), and
then its copy, or its CPU computation, waits for a read of ``disk_latency + bytes /
disk_bandwidth`` first: ``t_copy`` and ``t_cpu`` grow by ``p_read * t_read``. On a
profile of this CPU (``kind: cpu``: RAM the tier the CPU computes from, every miss a disk
read) a read also costs the compute thread its hand-over and its CPU time, and a wait for
it the thread's waking (``read_submit_overhead``, ``read_cpu``, ``read_wake_curve``):
``lru`` and ``ondemand`` pay all three a miss, ``gate-prefetch`` the first two.

On a GPU (``kind: gpu`` profiles) a layer's experts of the usual formats are computed in
one grouped call (executors/grouped.py): ``t_dev`` is then an expert's work alone and the
call's launches, counted, are part of ``T_ne``; the draft's 4-bit experts keep their own.

These are estimates, not measurements: ``moespeq bench`` on the mock backend, or a run on
the real GPU, measures.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from moespeq_cli.errors import UsageError
from moespeq_cli.models.base import CausalLM, fuse_attention_projections
from moespeq_cli.models.config import MoEConfig
from moespeq_cli.models.expert_format import fp8_tiles
from moespeq_cli.quant.draft import path_bytes_per_weight, planned_path
from moespeq_cli.runtime.backends import library_bytes
from moespeq_cli.runtime.executors.draft import draft_scratch_bytes, grouped_layer_seconds
from moespeq_cli.runtime.executors.grouped import call_ops, dequant_traffic, grouped_scratch_bytes, groups_on
from moespeq_cli.runtime.executors.instrument import charges
from moespeq_cli.runtime.planning.costs import (
    device_expert_seconds,
    elem_size,
    expert_cost,
    host_expert_seconds,
    transfer_seconds,
)
from moespeq_cli.runtime.planning.hardware import HardwareProfile
from moespeq_cli.runtime.planning.opcache import count_key, remembered
from moespeq_cli.runtime.planning.planner import Plan, make_plan
from moespeq_cli.runtime.scheduling.governor import GovernorState, union_size
from moespeq_cli.runtime.timeline import region_kind

DEFAULT_ACCEPTANCE = 0.8
# the draft verdict (``speculation_cannot_pay``) takes the quick op estimates' answer when
# the two sides differ by more than this, and the answer stands with those estimates'
# launches multiplied by QUICK_OPS_SPAN (the modules' op estimates fall short of the count:
# 91 ops a pass against 136-148 counted on the benchmark's Mixtral-shaped checkpoint,
# which turned the RTX 4090 verdict around); otherwise it counts the ops on the meta device
VERDICT_MARGIN = 1.1
QUICK_OPS_SPAN = 2.5


@dataclass
class Estimate:
    policy: str
    tokens_per_s: float
    hit_rate: float
    spec_depth: int | None = None  # moespeq: the governor's k for these figures
    cpu_experts: bool = False

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "tokens_per_s": round(self.tokens_per_s, 3),
            "hit_rate": round(self.hit_rate, 4),
            "spec_depth": self.spec_depth,
            "cpu_experts": self.cpu_experts,
        }


class StepModel:
    """Times of the pieces of a decode step for one model on one hardware profile.
    ``model`` (a shape model, usually on the meta device) gets its attentions' q, k and v
    fused into one product, as every backend runs them (the device tier, the mock, the CPU
    kernels): its charges and op count then price the code that runs."""

    def __init__(self, model: CausalLM, cfg: MoEConfig, hw: HardwareProfile, dtype: torch.dtype, context: int):
        if not any(hasattr(m, "fused_qkv") for m in model.modules()):
            fuse_attention_projections(model)
        self.model, self.cfg, self.hw, self.dtype, self.context = model, cfg, hw, dtype, context
        self.elem = elem_size(dtype)
        # on a GPU the engine pairs the routers (engine.py ``load``)
        self.table = charges(model, self.elem, paired=hw.kind != "cpu")
        self.layers = len(cfg.moe_layers)
        self.expert_bytes = cfg.stored_expert_bytes  # what a copy or a read moves
        self.t_link = transfer_seconds(self.expert_bytes, hw)
        self.read_extra = 0.0  # seconds of disk read per expert missing from the device (``for_plan``)
        self._ops: dict[tuple[int, bool], int | None] = {}  # (tokens, grouped) -> ops outside the experts
        self.counted = True  # False: the charges' op estimates, not a count on the meta device (fast)
        self.op_scale = 1.0  # those estimates multiplied by this (the verdict's check of their shortfall)
        self.draft_blocksize = 64  # the 4-bit draft's quantization block (EngineOptions.blocksize)
        # a GPU with a grouped GEMM kernel computes a layer's experts in one call
        # (executors/grouped.py): its launches per layer, counted (as unfused gate and up:
        # at most one op too many)
        fmt = cfg.expert_format
        tiles = all(fp8_tiles(s, fmt.block) for s in fmt.matrix_shapes(cfg.hidden_size, cfg.expert_intermediate))
        grouped = groups_on(hw, cfg, dtype)
        self.grouped_ops = call_ops(fmt, False, True, tiles) if grouped else None
        # bytes a weight an expert's computation on the device moves: compact experts
        # computed together are dequantized first (executors/grouped.py), then read as ``dtype``
        self.device_elem = self.elem + (dequant_traffic(fmt, dtype, tiles) if grouped else 0.0)

    def for_plan(self, plan: Plan) -> StepModel:
        """This model with ``plan``'s disk tier priced in (module docstring)."""
        step = copy.copy(self)
        step.read_extra = 0.0
        n, s, h = plan.total_experts, plan.slots, plan.host_slots
        if plan.disk_tier and n > s and plan.compute_tier == "device":  # on the host tier the link is the disk
            if self.hw.disk_bandwidth is None or self.hw.disk_latency is None:
                raise UsageError(
                    f"hardware profile {self.hw.called} has no disk_bandwidth / disk_latency to price the disk tier "
                    "with (the experts do not all fit in --ram); add them to the profile or raise --ram"
                )
            # with CPU experts (hybrid, moespeq's; the plan's flag is the policy's
            # host_compute) the device's set is placed once: RAM never reads it again and, an
            # LRU, keeps only the others; else RAM keeps what it read for a copy
            p_read = max(0.0, 1.0 - (h if plan.cpu_experts else max(0, h - s)) / (n - s))
            step.read_extra = p_read * (self.hw.disk_latency + self.expert_bytes / self.hw.disk_bandwidth)
        return step

    @property
    def read_host(self) -> float:
        """On a profile of this CPU (``kind: cpu``, every miss a disk read): what a read costs
        the compute thread beyond the disk's time, handing it to the I/O threads and its own
        CPU time (``read_submit_overhead``, ``HardwareProfile.read_cpu``: the mock charges both)."""
        if self.hw.kind != "cpu":
            return 0.0
        return self.hw.read_submit_overhead + self.hw.read_cpu(self.expert_bytes)

    @property
    def read_wake(self) -> float:
        """... and, where the compute thread waited for the read, its waking
        (``HardwareProfile.read_wake``; the thread blocked about as long as the read takes,
        as ``ondemand``'s does: ``lru`` submits a layer's misses before it waits for the
        first, so it waits less for the later ones and this prices its wakes a little high)."""
        return self.hw.read_wake(self.t_copy) if self.hw.kind == "cpu" else 0.0

    @property
    def t_copy(self) -> float:
        """An expert missing from the device brought there: a copy, and a read first when RAM
        does not hold it either."""
        return self.t_link + self.read_extra

    def non_expert(self, tokens: int, grouped: bool | None = None, call_ops: int | None = None) -> float:
        """A forward pass over ``tokens`` tokens without the routed experts: the work of
        every charged module, the launches of every op the pass dispatches outside the
        experts (``pass_ops``), its host syncs (one per MoE layer and the logits) and the
        host time a calibrated profile measured beyond all that (``host_time``).
        ``grouped``, ``call_ops``: as ``pass_ops`` (with ``call_ops`` the grouped calls'
        host time is priced elsewhere too)."""
        grouped = self.grouped_ops is not None if grouped is None else grouped
        work = sum(cost(tokens, self.context).seconds(self.hw, ops=0) for _m, _n, _l, cost, _r in self.table)
        syncs = (self.layers + 1) * self.hw.sync_overhead
        ops = self.pass_ops(tokens, grouped, call_ops)
        host = ops * self.hw.launch_overhead + syncs + self.host_time(grouped and call_ops is None)
        return work + max(0.0, host)  # a measured overhead below the op count's price: never below the work

    def draft_pass(self, grouped: bool = False) -> float:
        """The draft's pass over one token without its experts: its executor's ops expert
        by expert, or (``grouped``) without them, each layer's experts in a grouped call
        that ``t_draft_expert`` prices, launches and host time included
        (runtime/executors/draft.py)."""
        return self.non_expert(1, grouped=grouped, call_ops=0 if grouped else None)

    def host_time(self, grouped: bool) -> float:
        """The Python a pass runs beyond its ops, as the mock charges it from the profile's
        measured ``region_overhead`` (0 in the bundled profiles): each charged module's
        region, a grouped layer's expert calls (``grouped``), and the code between regions
        per layer. A grouped layer counts one call and the sum; where its copies land late
        it makes two calls (executors/offload.py), not modelled here."""
        hw = self.hw
        from moespeq_cli.kernels.modules import one_call_attention

        regions = sum(hw.host_overhead(region_kind(name), one_call_attention(m)) for m, name, _l, _c, _r in self.table)
        if grouped:
            regions += self.layers * (hw.host_overhead("experts") + hw.host_overhead("experts sum"))
        return regions + hw.between_regions(len(self.model.model.layers))

    def pass_ops(self, tokens: int, grouped: bool | None = None, call_ops: int | None = None) -> int:
        """The ops a forward pass over ``tokens`` tokens dispatches besides the experts'
        own, counted by running the model on the meta device (no weights) with a stand-in
        executor that groups tokens by expert as the real one does (token t takes experts
        t K .. t K + K - 1, modulo E); the charges' estimates where the meta run fails.
        ``grouped`` (default: whether this GPU groups a layer's experts): the layer's
        experts in one grouped call, its launches counted apart (``call_ops`` a layer,
        default the target's call's), instead of the executor's ops expert by expert."""
        grouped = self.grouped_ops is not None if grouped is None else grouped
        key = (tokens, grouped)
        if key not in self._ops:
            # counting runs the model on the meta device: a second in a fresh process (torch's
            # Python meta kernels import torch._dynamo), so a count is remembered across runs
            self._ops[key] = (
                remembered(
                    count_key(self.model, self.cfg, tokens, grouped),
                    lambda: count_pass_ops(self.model, self.cfg, tokens, grouped),
                )
                if self.counted
                else None
            )
            if self._ops[key] is None:
                estimated = sum(cost(tokens, self.context).ops for _m, _n, _l, cost, _r in self.table)
                self._ops[key] = round(estimated * self.op_scale)
        if not grouped:
            return self._ops[key]
        return self._ops[key] + self.layers * (self.grouped_ops if call_ops is None else call_ops)

    def expert_cost(self, tokens: float, elem: float, kernel: str | None = None):
        return expert_cost(self.cfg.hidden_size, self.cfg.expert_intermediate, max(1, round(tokens)), elem, kernel)

    def t_dev(self, tokens: float = 1, elem: float | None = None) -> float:
        """One expert on the device: its work, and its own launches unless the layer's
        experts are computed together (their launches are then the pass's)."""
        return device_expert_seconds(
            self.expert_cost(tokens, elem or self.device_elem), self.hw, self.grouped_ops is not None
        )

    def t_draft_expert(self, on_device: float, tokens: float = 1, grouped: bool = False) -> float:
        """One of the draft's 4-bit experts, a share ``on_device`` of them on the device
        and the rest on the CPU: priced as the kernel the draft's code will run for it there
        (quant/draft.py ``planned_path``, the mock's pricing of the loaded draft), the
        measured host time of a draft expert's region included; ``grouped``: a layer's
        experts, all on the device, in one grouped call (executors/draft.py), whose work
        and launches are shared by its top-k experts."""
        H, inter, b = self.cfg.hidden_size, self.cfg.expert_intermediate, self.draft_blocksize
        if grouped and on_device >= 1.0:
            K, fmt, n = self.cfg.top_k, self.cfg.expert_format, max(1, round(tokens))
            return grouped_layer_seconds(self.hw, fmt, H, inter, K, b, self.dtype, n) / K

        def cost(device_type: str):
            path = planned_path(device_type, H, inter, b)
            return self.expert_cost(tokens, path_bytes_per_weight(path, b), f"draft:{path}")

        t_dev = cost("cuda" if self.hw.kind == "gpu" else "cpu").charged(self.hw, self.hw.host_overhead("draft expert"))
        if on_device >= 1.0:
            return t_dev
        act = max(1, round(tokens)) * H * self.elem
        return on_device * t_dev + (1 - on_device) * host_expert_seconds(cost("cpu"), act, self.hw)

    def t_cpu(self, tokens: float = 1, elem: float | None = None, read: bool = True) -> float:
        """One expert on the CPU over ``tokens`` tokens (and its read, when RAM may not hold
        it: ``read``; the draft's 4-bit experts are always in RAM)."""
        act = max(1, round(tokens)) * self.cfg.hidden_size * self.elem
        extra = self.read_extra if read else 0.0
        return host_expert_seconds(self.expert_cost(tokens, elem or self.elem), act, self.hw) + extra

    def per_token(self, policy: str, hit: float) -> float:
        L, K = self.layers, self.cfg.top_k
        ne, dev = self.non_expert(1), self.t_dev()
        if policy == "resident":
            return ne + L * K * dev
        waited = self.t_copy + self.read_host + self.read_wake  # a miss the compute thread waits for
        if policy == "ondemand":
            return ne + L * K * (waited + dev)
        if policy == "lru":
            return ne + L * K * dev + L * K * (1 - hit) * waited
        if policy == "gate-prefetch":  # reads handed over ahead: their submission is the compute thread's
            return L * max(ne / L + K * dev + K * (1 - hit) * self.read_host, K * (1 - hit) * self.t_copy)
        if policy == "gate-prefetch+cpu":
            # moespeq at k = 0: copies prefetched behind a layer's compute c; what the link
            # cannot hide goes to the link and the CPU together
            c, m = ne / L + K * dev, K * (1 - hit)
            return L * (c + max(0.0, m - c / self.t_copy) / (1 / self.t_copy + 1 / self.t_cpu()))
        if policy == "hybrid":
            return L * (ne / L + max(K * hit * dev, K * (1 - hit) * self.t_cpu()))
        raise ValueError(policy)

    def speculative(self, plan: Plan, hit: float, acceptance: float, k_max: int, cpu: bool) -> tuple[float, int]:
        """(tokens/s, k) of moespeq: the governor's best k >= 1, or k = 0 (gate-prefetch
        decoding, with the CPU where allowed) when that is faster."""
        plain = 1.0 / self.per_token("gate-prefetch+cpu" if cpu else "gate-prefetch", hit)
        if plan.has_draft:
            tps, k = self.best_depth(plan, hit, acceptance, k_max, cpu)
            if tps > plain:
                return tps, k
        return plain, 0

    def best_depth(
        self, plan: Plan, hit: float, acceptance: float, k_max: int, cpu: bool, depth: int | None = None
    ) -> tuple[float, int]:
        """(tokens/s, k) at the governor's best depth k >= 1 with ``plan``'s draft (at
        ``depth`` where given: a fixed ``--spec-depth``)."""
        L, K, E = self.layers, self.cfg.top_k, self.cfg.num_experts
        state = GovernorState(k_max, E, K, self.t_copy, t_host=self.t_cpu if cpu else None)
        # a verification's experts copied ahead of it need slots to wait in: with fewer
        # slots than its misses the rest are copied on demand, exposed (demo, H100, 7 slots
        # for a k = 4 verification's 11 misses: the mock met them all as stall)
        state.prefetch_room = float(plan.slots)
        for n in range(1, k_max + 2):
            u = union_size(n, E, K)
            state.t_target[n] = self.non_expert(n) + L * u * self.t_dev(n * K / u)
            state.misses[n] = L * u * (1 - hit)
        on_dev = plan.draft_device_experts / plan.total_experts if plan.total_experts else 0.0
        grouped = plan.draft_scratch_bytes > 0  # the plan reserved the grouped draft calls' scratch
        state.t_draft = self.draft_pass(grouped) + L * K * self.t_draft_expert(on_dev, grouped=grouped)
        state.p = [acceptance] * k_max
        state.tested = [1] * k_max
        k = depth or max(range(1, k_max + 1), key=lambda k: (state.theta(k), -k))
        return state.theta(k), k


def uniform_hit(plan: Plan) -> float:
    """The share of routed experts found on the device with uniform routing."""
    return min(1.0, plan.slots / plan.total_experts) if plan.total_experts else 1.0


def estimate(step: StepModel, plan: Plan, acceptance: float = DEFAULT_ACCEPTANCE, k_max: int = 8) -> Estimate:
    step = step.for_plan(plan)
    hit = uniform_hit(plan)
    if plan.policy == "moespeq":
        tps, k = step.speculative(plan, hit, acceptance, k_max, plan.cpu_experts)
        return Estimate("moespeq", tps, hit, k, plan.cpu_experts)
    if plan.policy == "ondemand":
        hit = 0.0
    return Estimate(plan.policy, 1.0 / step.per_token(plan.policy, hit), hit, cpu_experts=plan.policy == "hybrid")


def plan_moespeq(
    step: StepModel,
    budget: int,
    cpu_experts: bool,
    blocksize: int = 64,
    acceptance: float = DEFAULT_ACCEPTANCE,
    ram: int | None = None,
    compute_tier: str = "device",
    ram_source: str | None = None,
) -> tuple[Plan, Estimate]:
    """moespeq's plan as a run makes it (with the 4-bit draft), and its modelled speed:
    the better of speculating with that plan and what the governor falls back to when
    speculation cannot pay for the draft's memory -- k = 0 with that memory as expert
    slots (docs/governor.md). The plan's note says which the model expects. Where even
    every drafted token accepted could not pay for the draft's memory, the plan is the one
    without it (``speculation_cannot_pay``), as ``run`` makes it. ``compute_tier="host"``
    (a profile of this CPU): ``budget`` is RAM, which the CPU computes from; there is no
    grouped call to reserve scratch for, and run makes no verdict on the draft there."""
    step = copy.copy(step)
    step.draft_blocksize = blocksize
    args = (step.model, step.cfg, step.dtype, budget, step.context, "moespeq", blocksize, cpu_experts)
    host = compute_tier == "host"
    kw = dict(ram=ram, compute_tier=compute_tier, library_bytes=0 if host else library_bytes("mock", step.hw))
    kw["ram_source"] = ram_source  # how --ram was chosen, as run's plan says it
    kw["grouped_scratch"] = 0 if host else grouped_scratch_bytes(step.hw, step.cfg, step.dtype, step.context)
    scratch = 0 if host else draft_scratch_bytes(step.hw, step.cfg, blocksize, step.dtype)
    with_draft = make_plan(*args, draft_scratch=scratch, **kw)
    if with_draft.draft_scratch_bytes:
        # at the acceptance ``run`` assumes, so that plan shows what run does (``acceptance`` is for display)
        with_draft = scratch_verdict(step, with_draft, make_plan(*args, **kw))
    spec = estimate(step, with_draft, acceptance)
    if not with_draft.has_draft:
        return with_draft, spec
    released = make_plan(*args, with_draft=False, **kw)
    off = None if host else speculation_cannot_pay(step, with_draft, released)
    if off is not None:  # run does not load the draft (engine.py draft_verdict)
        return off, estimate(step, off, acceptance)
    plain = estimate(step, released, acceptance)
    if plain.tokens_per_s > spec.tokens_per_s:
        with_draft.note = (
            f"{with_draft.note + '; ' if with_draft.note else ''}by this model speculation does not pay for the "
            f"draft's memory here ({rate(spec.tokens_per_s)} vs {rate(plain.tokens_per_s)} tok/s at acceptance "
            f"{acceptance}): expect the governor to release the draft and decode with k = 0 and "
            f"{released.slots} slots"
        )
        return with_draft, plain
    return with_draft, spec


def scratch_verdict(
    step: StepModel, grouped: Plan, apart: Plan, acceptance: float = DEFAULT_ACCEPTANCE, depth: int | None = None
) -> Plan:
    """``grouped`` (the plan that reserves the draft's grouped calls' scratch,
    runtime/executors/draft.py) or ``apart`` (the same without it: the draft expert by
    expert, the scratch's memory as expert slots), whichever the cost model finds faster:
    on a small budget the slots the scratch takes can cost more than its launches save.
    With the same slots either way the grouped call wins (``draft_groups`` found it
    cheaper). Where both would decode at k = 0 alike, the faster speculation decides; a
    fixed ``depth`` (``--spec-depth``) speculates at that depth whatever the model says.
    Priced with the charges' op estimates (no count on the meta device: the two plans
    differ only in slots and the draft's calls, which the estimates price alike)."""
    if (apart.slots, apart.host_slots) == (grouped.slots, grouped.host_slots):
        return grouped
    quick = copy.copy(step)
    quick.counted, quick._ops = False, {}

    def speed(plan: Plan) -> tuple[float, ...]:
        s = quick.for_plan(plan)
        spec, _ = s.best_depth(plan, uniform_hit(plan), acceptance, max(8, depth or 0), plan.cpu_experts, depth)
        return (spec,) if depth else (estimate(quick, plan, acceptance).tokens_per_s, spec)

    return grouped if speed(grouped) > speed(apart) else apart


def speculation_cannot_pay(step: StepModel, with_draft: Plan, released: Plan, k_max: int = 8) -> Plan | None:
    """``released`` (the plan without the draft, its note saying why) when plain decoding
    with the draft's memory as expert slots is faster by the model than speculating would
    be even if every drafted token were accepted: no acceptance a run could measure makes
    the draft pay for its memory. Else None. ``run`` and ``plan`` both decide with it, so
    ``plan`` predicts what ``run`` loads."""
    if not with_draft.has_draft or released.slots <= with_draft.slots:
        return None
    hit = min(1.0, with_draft.slots / with_draft.total_experts)

    def sides(s: StepModel) -> tuple[float, float]:
        bound, _ = s.for_plan(with_draft).best_depth(with_draft, hit, 1.0, k_max, with_draft.cpu_experts)
        return bound, estimate(s, released).tokens_per_s

    quick = []  # the charges' op estimates first, as they are and scaled up: a clear verdict needs no count
    for scale in (1.0, QUICK_OPS_SPAN):
        s = copy.copy(step)
        s.counted, s._ops, s.op_scale = False, {}, scale
        quick.append(sides(s))
    clear = all(max(b, p) > VERDICT_MARGIN * min(b, p) for b, p in quick)
    # the count lies between the two scales: where both agree, the smaller ratio holds
    sure = clear and len({p > b for b, p in quick}) == 1
    ratio = min(p / b for b, p in (quick if sure else [sides(step)]))
    if ratio <= 1.0:
        return None
    # a ratio, not the two rates: a quick verdict's rates are the estimates', not the plan's row
    released.note = (
        f"speculation off: {released.slots - with_draft.slots} more full-precision experts in the draft's memory "
        f"beat speculating even with every drafted token accepted (plain decoding at least {ratio:.2f}x as "
        f"fast on {step.hw.name}, by the cost model); --spec-depth N keeps the draft"
    )
    return released


def rate(tokens_per_s: float) -> str:
    """A rate as people read it: three significant figures, never an exponent (1790, 7.81, 0.54)."""
    return f"{tokens_per_s:.0f}" if tokens_per_s >= 100 else f"{tokens_per_s:.3g}"


def count_pass_ops(model: CausalLM, cfg: MoEConfig, tokens: int, grouped: bool = False) -> int | None:
    """``StepModel.pass_ops``: None when the model cannot run on the meta device;
    ``grouped``: without the executor's own ops (a grouped call's are counted apart)."""
    from moespeq_cli.runtime.executors import experts as executor
    from moespeq_cli.runtime.executors.opcount import OpCounter

    counter = OpCounter(skip_casts=True)
    K, E = cfg.top_k, cfg.num_experts

    def read(ids, extra=None):  # a meta tensor has no values: a routing of distinct experts
        return [[(t * K + j) % E for j in range(K)] for t in range(ids.shape[0])], None

    def experts(layer, x, ids, weights, rows, ahead=None):
        if grouped:
            counter.paused += 1
            out = torch.zeros_like(x)
            counter.paused -= 1
            return out

        def run(e, xe):
            counter.paused += 1  # the expert's own ops are priced with the expert
            out = torch.zeros_like(xe)
            counter.paused -= 1
            return out

        return executor.grouped(x, ids, weights, run, groups=executor.token_groups(rows))

    saved = {i: (b.experts, b.read_routing) for i, b in model.moe_blocks.items()}
    model.set_experts(experts)
    for b in model.moe_blocks.values():
        b.read_routing = read
    try:
        cache = model.new_cache()
        model(torch.zeros(1, dtype=torch.long, device="meta"), cache)  # a decode step finds its KV cache made
        ids = torch.zeros(tokens, dtype=torch.long, device="meta")  # the input, made before counting
        with counter:
            model(ids, cache)

    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None
    finally:
        for i, b in model.moe_blocks.items():
            b.experts, b.read_routing = saved[i]
    return counter.ops
