"""The memory planner: what lives on the device, what in host RAM, what stays on disk.

Budget = non-expert weights (attention, norms, routers, shared experts, dense layers,
embeddings, LM head; full precision) + the KV cache for the requested context +
activation workspace + N full-precision expert slots. The planner works from the model's
shapes alone (a model on the meta device), so an impossible budget is refused before any
weight is read, with what it needs and what to change.

moespeq's 4-bit draft: when all of it fits beside ``top_k`` expert slots it all goes on the
device. When it does not, and experts may run on the CPU (the default), half of the room
above ``top_k`` slots goes to draft experts (the same number per layer) and the rest to
slots; the draft computes its other experts on the CPU from 4-bit host copies. With
``--no-cpu-experts`` a draft that does not fit is dropped (k = 0: the governor decodes
with gate-prefetch or without, whichever it measures faster).

Host RAM (``--ram``, docs/design.md §9) is the budget of expert buffers in host memory: the
full-precision experts it holds and the 4-bit draft's experts that are not on the device.
When every routed expert fits, they all stay in RAM (two tiers, as before); when not, RAM
holds ``host_slots`` of them as a cache over the checkpoint's files (the disk tier). On
a machine with no GPU (``--backend cpu``) RAM *is* the compute tier: the plan's budget is
``--ram`` and its slots are RAM slots; the non-expert weights, KV cache and workspace
live in RAM too but outside that budget (they are reported, not counted). With no
``--ram`` the budget is what the machine has available minus a margin
(``default_ram``), and the plan says so.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from moespeq_cli.errors import UsageError
from moespeq_cli.models import base as model_base
from moespeq_cli.models import build_model
from moespeq_cli.models.base import ROLLBACK, CausalLM, window_bound
from moespeq_cli.models.config import MoEConfig
from moespeq_cli.runtime.executors.grouped import dequant_scratch_bytes
from moespeq_cli.runtime.planning.costs import elem_size
from moespeq_cli.runtime.planning.hardware import format_size, sizes_apart
from moespeq_cli.runtime.tiers.disk import BLOCK, ram_slot_bytes
from moespeq_cli.text import counted


@dataclass
class Plan:
    policy: str
    budget_bytes: int
    non_expert_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    expert_bytes: int  # one full-precision routed expert
    total_experts: int
    slots: int
    context_tokens: int
    draft_bytes: int = 0  # the 4-bit draft's routed experts on the device (moespeq)
    draft_device_experts: int = 0  # how many of the draft's experts are on the device
    cpu_experts: bool = False  # experts not on the device may be computed on the CPU
    has_draft: bool = False  # moespeq runs its 4-bit draft (on the device, the CPU, or both)
    note: str | None = None  # what the planner decided that the user should know
    host_budget_bytes: int | None = None  # --ram: expert buffers in host memory (None: unbounded)
    host_slots: int = 0  # full-precision experts host RAM holds (total_experts: no disk tier)
    host_draft_bytes: int = 0  # the 4-bit draft's experts held in host RAM
    draft_scratch_bytes: int = 0  # device memory the draft's grouped calls take (executors/draft.py)
    compute_tier: str = "device"  # "host": --backend cpu, RAM slots are what the CPU computes from
    ram_source: str | None = None  # how the --ram budget was chosen, when not given
    ram_slot_bytes: int = 0  # what one expert takes in RAM (whole pages for in-place reads)

    @property
    def disk_tier(self) -> bool:
        """Experts are read from the checkpoint's files while decoding."""
        return self.host_slots < self.total_experts

    @property
    def fixed_bytes(self) -> int:
        """What the budget holds besides the expert slots."""
        if self.compute_tier == "host":
            return self.draft_bytes  # weights, KV cache and workspace are in RAM, outside --ram
        return (
            self.non_expert_bytes
            + self.kv_cache_bytes
            + self.workspace_bytes
            + self.draft_bytes
            + self.draft_scratch_bytes
        )

    @property
    def slot_bytes(self) -> int:
        return self.slots * (self.ram_slot_bytes if self.compute_tier == "host" else self.expert_bytes)

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.fixed_bytes - self.slot_bytes

    @property
    def host_bytes(self) -> int:
        """Expert buffers in host RAM: full-precision experts and the draft's."""
        return self.host_slots * self.ram_slot_bytes + self.host_draft_bytes

    @property
    def all_experts_ram_bytes(self) -> int:
        """Every expert in RAM slots: a --ram of at least this holds the whole model's
        experts (``--backend cpu`` then decodes from memory, without offloading)."""
        return self.total_experts * self.ram_slot_bytes

    @property
    def ram_held_bytes(self) -> int:
        """What --ram's buffers take in RAM: expert slots and the draft's experts there (all
        of the draft where the CPU computes from RAM)."""
        return self.host_bytes + (self.draft_bytes if self.compute_tier == "host" else 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            fixed_bytes=self.fixed_bytes,
            slot_bytes=self.slot_bytes,
            resident_fraction=round(self.slots / self.total_experts, 4) if self.total_experts else 1.0,
            host_bytes=self.host_bytes,
            ram_held_bytes=self.ram_held_bytes,
            disk_tier=self.disk_tier,
        )
        return d

    def rows(self) -> list[tuple[str, int]]:
        """The budget's breakdown (the device's; RAM's on the cpu backend)."""
        draft = (
            [(f"4-bit draft experts ({self.draft_device_experts} of {self.total_experts})", self.draft_bytes)]
            if self.draft_bytes
            else []
        )
        if self.compute_tier == "host":
            return [
                (f"expert slots in RAM ({self.slots} of {self.total_experts})", self.slot_bytes),
                *draft,
                ("unused", self.free_bytes),
            ]
        return [
            ("non-expert weights", self.non_expert_bytes),
            ("KV cache", self.kv_cache_bytes),
            ("workspace", self.workspace_bytes),
            (f"expert slots ({self.slots} of {self.total_experts})", self.slot_bytes),
            *draft,
            *([("4-bit draft's dequantizing scratch", self.draft_scratch_bytes)] if self.draft_scratch_bytes else []),
            ("unused", self.free_bytes),
        ]

    def tier_line(self) -> str:
        """Where the experts live, in one line: device, RAM, disk."""
        n = self.total_experts
        if self.compute_tier == "host":
            parts = [f"RAM {self.slots} of {n} experts"]
        else:
            parts = [f"device {self.slots} of {n} experts", f"RAM {self.host_slots}"]
        if self.disk_tier:
            parts.append(f"disk the other {n - self.host_slots} (read as needed)")
        return ", ".join(parts)


def kv_cache_bytes(model: CausalLM, elem: int, context: int) -> int:
    """The KV cache at ``context`` tokens: every layer's bytes a position times the
    positions it holds (a sliding-window layer's at most ``2 * window_keep``: KVCache)."""
    total, windows = 0, model.windows()
    for i, layer in enumerate(model.model.layers):
        attn = layer.attn
        if hasattr(attn, "cache_elems"):  # MLA: one latent row, its values a view of it
            per = attn.cache_elems()
        else:
            _, kv_heads, dk, dv = attn.kv_dims()
            per = kv_heads * (dk + dv)
        held = window_bound(windows[i], context) if i in windows else context
        total += per * elem * held
    return total


DEFAULT_DEPTH = 8  # the governor's deepest draft by default (EngineOptions.k_max)


def recurrent_state_bytes(model: CausalLM, states: int = DEFAULT_DEPTH + 2) -> int:
    """Linear-attention layers (Qwen3-Next, Qwen3.5) hold a fixed-size state instead of a KV
    cache, ``states`` of them a layer (``rollback_states``)."""
    per = sum(getattr(layer.attn, "state_bytes", lambda: 0)() for layer in model.model.layers)
    return per * states


def rollback_states(policy: str, drafts: bool, depth: int = DEFAULT_DEPTH) -> int:
    """Linear-attention states a layer keeps: speculative decoding one per position of a
    cycle, so that it can roll back to any (models/base.py KVCache): its start, ``depth``
    drafted tokens and the verification's bonus token; moespeq without a draft still keeps
    a cycle's start and end (``keep_from`` each cycle); a policy without speculation the
    newest only."""
    return depth + 2 if policy == "moespeq" and drafts else 2 if policy == "moespeq" else 1


def draft_bytes_estimate(cfg: MoEConfig, blocksize: int = 64) -> int:
    """4-bit routed experts: half a byte per weight plus one fp32 absmax per block, per
    projection (each quantized on its own, so each rounds up on its own), and any biases
    in the checkpoint's dtype."""
    h, i = cfg.hidden_size, cfg.expert_intermediate
    fmt = cfg.expert_format
    per_expert = sum(-(-(a * b) // 2) + -(-(a * b) // blocksize) * 4 for a, b in fmt.matrix_shapes(h, i))
    per_expert += fmt.bias_numel(h, i) * cfg.dtype.itemsize
    return per_expert * cfg.num_experts * len(cfg.moe_layers)


def checkpoint_plan(ckpt, context: int, budget: int = 10**15, policy: str = "lru", dtype=None, **kw) -> Plan:
    """``make_plan`` for a Checkpoint, its model built on the meta device (no weights read).
    The default budget is unbounded: the plan then gives the fixed part and expert sizes."""
    model = build_model(ckpt.arch, ckpt.raw_config, context, str(ckpt.path / "config.json"))
    return make_plan(model, ckpt.config, dtype or ckpt.config.dtype, budget, context, policy, **kw)


def spread(count: int, layers: list[int], num_experts: int) -> list[tuple[int, int]]:
    """``count`` (layer, expert) keys, the same number per layer (later layers take the
    remainder), lowest expert ids first: a placement that assumes no routing statistics."""
    per_layer = [min(num_experts, (count + i) // len(layers)) for i in range(len(layers))]
    return [(layer, e) for layer, n in zip(layers, per_layer, strict=True) for e in range(n)]


def activation_bytes(cfg: MoEConfig, ffn: int, context: int, elem: int, held: int) -> int:
    """What a pass over ``context`` tokens holds at once besides attention's tiles, the
    logits and the grouped calls' scratch. One part's activations: a layer's attention,
    dense MLP and shared experts take ``PREFILL_PART`` tokens at a time (models/base.py),
    as does an expert (executors/experts.py): the normed input, queries, keys and values,
    attention's output, an MLP's gate, up and their product. And over the whole pass the
    MoE block's, whose experts take the pass in one call: the residual stream before and
    after attention, the block's input and output, the shared experts' output, the layer's
    result, the rows an expert takes, ``held`` experts' outputs a token (computed expert by
    expert they are summed in expert order at the end: top-k of them; grouped calls sum
    theirs a part at a time, 0; a CPU expert's output is held whole), and the router's fp32
    logits and choices (with the next layer's guess: twice). A long prompt's peak is
    checked against the plan with a dispatch-mode counter in tests/test_prefill_parts.py."""
    h = cfg.hidden_size
    part = min(context, model_base.PREFILL_PART) * (8 * h + 3 * ffn) * elem
    routing = 2 * cfg.num_experts * 4 + 2 * cfg.top_k * (4 + 8)
    return part + context * ((6 + held) * h * elem + routing)


def make_plan(
    model: CausalLM,
    cfg: MoEConfig,
    dtype: torch.dtype,
    budget: int,
    context: int,
    policy: str,
    blocksize: int = 64,
    cpu_experts: bool = False,
    with_draft: bool = True,
    max_slots: int | None = None,
    ram: int | None = None,
    compute_tier: str = "device",
    ram_source: str | None = None,
    library_bytes: int = 0,
    draft_scratch: int = 0,
    depth: int = DEFAULT_DEPTH,
    grouped_scratch: int = 0,
) -> Plan:
    """``model`` may live on the meta device: only shapes are read. For moespeq the 4-bit
    draft is placed too unless ``with_draft`` is False (module docstring); ``note`` says
    what the planner decided. ``max_slots`` caps the expert slots (bench's same-cache
    budget). ``ram``: host RAM for expert buffers (None: every expert fits);
    ``compute_tier="host"``: ``budget`` is that RAM and the CPU computes from it.
    ``library_bytes``: what the device's BLAS libraries hold for the compute stream (their
    workspaces, allocated at the first matmul and kept), counted in the workspace.
    ``draft_scratch``: what the draft's grouped calls take on the device besides its
    experts (runtime/executors/draft.py ``draft_scratch_bytes``), reserved with a draft
    wholly on the device. ``grouped_scratch``: what a layer's grouped expert calls hold
    over a prompt on a GPU that groups them (executors/grouped.py ``grouped_scratch_bytes``),
    in the workspace. ``depth``: the most tokens a cycle drafts (the governor's range,
    or ``--spec-depth``), which sets the linear-attention states a cycle keeps."""
    elem = elem_size(dtype)
    non_expert = sum(p.numel() for p in model.parameters()) * elem
    states = rollback_states(policy, with_draft and not cfg.expert_format.four_bit, depth)
    kv = kv_cache_bytes(model, elem, context) + recurrent_state_bytes(model, states)
    biggest_ffn = max(
        [cfg.expert_intermediate]
        + [
            m.weight.shape[0]
            for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m.weight.shape[1] == cfg.hidden_size and m is not model.lm_head
        ]
    )
    # a pass's activations over the whole context (a prefill, in parts), and the logits of the
    # longest pass that keeps them all: a verification's (a prefill keeps its last row)
    # grouped calls sum their parts' outputs as they go; the CPU's outputs are held whole
    held = 0 if grouped_scratch and not cpu_experts else cfg.top_k
    workspace = activation_bytes(cfg, biggest_ffn, context, elem, held) + 2 * ROLLBACK * cfg.vocab_size * 4
    # and attention's transient (one layer at a time): masks, gpt-oss's tiles of scores
    workspace += max(
        (getattr(b.attn, "scratch_bytes", lambda c, e: 0)(context, elem) for b in model.model.layers), default=0
    )
    # compact experts (block FP8, MXFP4) are dequantized on the device a few at a time (executors/grouped.py)
    workspace += dequant_scratch_bytes(cfg.expert_format, cfg.hidden_size, cfg.expert_intermediate, cfg.top_k, elem)
    workspace += library_bytes + grouped_scratch if compute_tier == "device" else 0
    expert = cfg.stored_expert_bytes  # (the tiers hold experts as stored: --dtype sets the dense weights')
    ram_slot = ram_slot_bytes(expert)
    total = cfg.num_experts * len(cfg.moe_layers)
    on_host = compute_tier == "host"
    slot = ram_slot if on_host else expert  # what one slot of the budget's tier takes
    fixed = 0 if on_host else non_expert + kv + workspace
    where = "--ram" if on_host else "--vram"
    draft, note = 0, None
    scratch = 0  # the draft's grouped calls' scratch on the device (only with the whole draft there)
    total_draft = draft_device = 0
    cpu_draft_off = False  # the draft dropped because its host part does not fit in RAM
    if policy == "moespeq" and with_draft and cfg.expert_format.four_bit:
        note = (
            f"the experts are stored 4-bit already ({cfg.expert_format.quant}): a 4-bit draft of them would be no "
            "smaller and no faster, so speculation is off (k = 0)"
        )
        with_draft = False
    if policy == "moespeq" and with_draft:
        total_draft = draft = draft_bytes_estimate(cfg, blocksize)
        draft_device = total
        room = budget - fixed - cfg.top_k * slot  # above the minimum slots
        if not on_host and room >= draft + draft_scratch:
            scratch = draft_scratch
        elif room < draft and cpu_experts and not on_host:
            per_draft_expert = draft / total
            draft_device = int(max(0, room // 2) // per_draft_expert)
            draft = int(draft_device * per_draft_expert)
            note = (
                f"the 4-bit draft ({format_size(total_draft)}) does not fit beside {counted(cfg.top_k, 'expert slot')}: "
                f"{draft_device} of its {total} experts are on the device, the rest run on the CPU"
            )
        elif room < draft:
            note = (
                f"the 4-bit draft ({format_size(draft)}) does not fit in {where} beside {counted(cfg.top_k, 'expert slot')}: "
                f"speculation is off (k = 0); raise {where} to enable it"
            )
            draft = draft_device = 0
        host_part = total_draft - draft if (draft or cpu_experts) else 0
        if ram is not None and not on_host and host_part and host_part + cfg.top_k * ram_slot > ram:
            note = (
                f"the 4-bit draft's experts kept in RAM ({format_size(host_part)}) do not fit in --ram "
                f"{format_size(ram)} beside {cfg.top_k} experts: speculation is off (k = 0); "
                "raise --ram or --vram to enable it"
            )
            draft = draft_device = scratch = 0
            cpu_draft_off = True
    fixed += draft + scratch
    free = budget - fixed
    need_min = fixed + cfg.top_k * slot
    if free < cfg.top_k * slot:
        have, need = sizes_apart(budget, need_min)
        if on_host:
            each = format_size(slot) + (
                f" (an expert of {format_size(expert)} read in whole {BLOCK // 1024} KiB pages)"
                if slot != expert
                else ""
            )
            raise UsageError(
                f"{ram_named(have, ram_source)} cannot hold {counted(cfg.top_k, 'expert slot')} of {each}"
                + (f" beside the 4-bit draft ({format_size(draft)})" if draft else "")
                + f"; it needs at least {need} -- {ram_remedy(ram_source)}"
            )
        raise UsageError(
            f"--vram {have} cannot hold this model's fixed part ({format_size(fixed)}: weights "
            f"{format_size(non_expert)}, KV cache {format_size(kv)} for {context} tokens, workspace {format_size(workspace)}) "
            f"plus {counted(cfg.top_k, 'expert slot')}; it needs at least {need} -- raise --vram or ask for fewer tokens (-n, --context, the prompt)"
        )
    slots = min(total, free // slot, max_slots if max_slots is not None else total)
    if policy == "resident" and slots < total:
        tier = "in RAM" if on_host else "on the device"  # the tier the experts are computed from
        raise UsageError(
            f"policy resident needs every expert {tier}: {format_size(fixed + total * slot)} in all, "
            f"but {where} is {format_size(budget)}; raise {where} or choose an offloading policy"
        )
    if policy == "ondemand":
        slots = min(slots, cfg.top_k)  # staging buffers only: ondemand keeps nothing
    has_draft = policy == "moespeq" and with_draft and (draft > 0 or cpu_experts) and not cpu_draft_off
    host_draft = 0 if on_host else (total_draft - draft if has_draft else 0)
    if on_host:
        host_slots = int(slots)
    elif ram is None:
        host_slots = total
    else:
        host_slots = host_plan(cfg, ram_slot, ram, host_draft, ram_source)
    return Plan(
        policy,
        budget,
        non_expert,
        kv,
        workspace,
        expert,
        total,
        int(slots),
        context,
        draft,
        draft_device,
        cpu_experts,
        has_draft,
        note,
        host_budget_bytes=budget if on_host else ram,
        host_slots=host_slots,
        host_draft_bytes=host_draft,
        compute_tier=compute_tier,
        ram_source=ram_source,
        ram_slot_bytes=ram_slot,
        draft_scratch_bytes=scratch if has_draft else 0,
    )


def ram_named(have: str, source: str | None) -> str:
    """The RAM budget as an error names it: ``--ram X`` as given, or how it was found."""
    return f"--ram {have}" if source is None else f"the RAM left for experts, {have} ({source}),"


def ram_remedy(source: str | None) -> str:
    if source is None:
        return "raise --ram"
    return "free some memory (or raise the memory limit this runs under), or give --ram"


def host_plan(cfg: MoEConfig, expert: int, ram: int, draft_bytes: int, source: str | None = None) -> int:
    """Full-precision experts host RAM holds beside the draft's (all of them when they
    fit), ``expert`` bytes each (its RAM slot); a budget that cannot stage ``top_k`` of
    them is refused (``source``: how the budget was found, when not given)."""
    total = cfg.num_experts * len(cfg.moe_layers)
    room = ram - draft_bytes
    if room < cfg.top_k * expert:
        have, need = sizes_apart(ram, draft_bytes + cfg.top_k * expert)
        raise UsageError(
            f"{ram_named(have, source)} cannot hold {counted(cfg.top_k, 'expert slot')} of {format_size(expert)}"
            + (f" beside the 4-bit draft's host experts ({format_size(draft_bytes)})" if draft_bytes else "")
            + f"; it needs at least {need} -- {ram_remedy(source)}"
        )
    return int(min(total, room // expert))


RAM_MARGIN_FRACTION = 0.10  # of total memory, at least RAM_MARGIN_MIN: the OS, other programs
RAM_MARGIN_MIN = 2**30


def memory_info() -> tuple[int, int] | None:
    """(total, available) bytes of memory this process may use: the machine's (MemTotal,
    MemAvailable from /proc/meminfo), or a memory cgroup's limit where it is lower (a
    container, a systemd unit with MemoryMax: the kernel stops the process at the limit
    without a word, whatever the machine has). None where the system does not say."""
    found = memory_and_source()
    return None if found is None else found[:2]


def memory_and_source() -> tuple[int, int, bool] | None:
    """``memory_info``'s figures and whether what is available is the cgroup's (tighter
    than the machine's)."""
    machine = machine_memory()
    if machine is None:
        return None
    limited = cgroup_memory()
    if limited is None:
        return (*machine, False)
    return min(machine[0], limited[0]), min(machine[1], limited[1]), limited[1] <= machine[1]


def machine_memory() -> tuple[int, int] | None:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo (sysconf where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return info["MemTotal"], info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return None


CGROUP_ROOT = "/sys/fs/cgroup"


def _cgroup_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read(64).strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _cgroup_inactive_file(path: str, key: str) -> int:
    """Page cache the kernel reclaims before it stops the group (memory.stat's ``key``)."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_memory(root: str = CGROUP_ROOT, self_cgroup: str = "/proc/self/cgroup") -> tuple[int, int] | None:
    """(limit, what is left under it) of the tightest memory cgroup this process is in and
    its ancestors (cgroup v2's ``memory.max``/``memory.current``, v1's
    ``memory.limit_in_bytes``/``memory.usage_in_bytes``; the page cache it holds counts as
    left, as the kernel reclaims it first); None without a limit."""
    try:
        with open(self_cgroup) as f:
            lines = f.read(65536).splitlines()
    except OSError:
        return None
    levels = []  # (directory, limit file, usage file, memory.stat key)
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if "memory" in controllers.split(","):  # v1
            base, files = (
                os.path.join(root, "memory"),
                ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
            )
        elif hid == "0" and controllers == "":  # v2 (unified, or under "unified" in a hybrid layout)
            base = root if os.path.exists(os.path.join(root, "cgroup.controllers")) else os.path.join(root, "unified")
            files = ("memory.max", "memory.current", "inactive_file")
        else:
            continue
        here = os.path.join(base, path.strip("/"))
        if not os.path.isdir(here):  # a cgroup namespace (a container): its own group is the mount's root
            here = base
        while True:
            levels.append((here, *files))
            if os.path.normpath(here) == os.path.normpath(base):
                break
            here = os.path.dirname(here)
    best = None
    for here, limit_file, usage_file, key in levels:
        limit = _cgroup_int(os.path.join(here, limit_file))
        if limit is None or limit >= 2**60:  # v1's "no limit" is a page-rounded 2^63 - 1
            continue
        usage = _cgroup_int(os.path.join(here, usage_file)) or 0
        left = max(0, limit - max(0, usage - _cgroup_inactive_file(os.path.join(here, "memory.stat"), key)))
        if best is None or left < best[1]:
            best = (limit, left)
    return best


def beyond_memory(ram: int, held: int) -> str | None:
    """A note when a given ``--ram`` lets expert buffers take more RAM (``held`` bytes)
    than this machine has available now: the system would swap, or stop the run for want of
    memory. None where it fits or the machine does not say."""
    info = memory_info()
    if info is None or held <= info[1]:
        return None
    return (
        f"--ram {format_size(ram)} lets experts take {format_size(held)} of RAM where this machine has "
        f"{format_size(info[1])} available: it would swap or run out of memory; give a smaller --ram, "
        "or leave it out to size it to what is available"
    )


def host_tier_ram(sizes: Plan, ram: int | None) -> tuple[int, str | None]:
    """--ram of a plan whose CPU computes from RAM (``--backend cpu``; the mock with a
    profile of ``kind: cpu``, and ``plan`` with one): ``ram`` where given, else what is
    available beside the non-expert weights, KV cache and workspace (``sizes``, an
    unbounded plan: the CPU keeps them in RAM too), every expert where the machine does not
    say; and how it was chosen (None: given)."""
    if ram is not None:
        return ram, None
    found, source = default_ram(sizes.non_expert_bytes + sizes.kv_cache_bytes + sizes.workspace_bytes)
    return (found if found is not None else sizes.all_experts_ram_bytes), source


def default_ram(resident_bytes: int = 0) -> tuple[int | None, str]:
    """The --ram budget when none is given: what the machine (or the memory cgroup it runs
    in) has available now, minus a margin (10% of its memory, at least 1 GiB or a quarter
    of it) and ``resident_bytes`` that will live in
    RAM outside the budget (the non-expert weights on the cpu backend). (None, why) when
    the machine does not say."""
    info = memory_and_source()
    if info is None:
        return None, "every expert in RAM (this system does not report its available memory)"
    total, available, limited = info
    # (a quarter of a small total, a container's of a few hundred MB, where 1 GiB is all of it)
    margin = max(min(RAM_MARGIN_MIN, total // 4), int(total * RAM_MARGIN_FRACTION))
    ram = available - margin - resident_bytes
    where = "memory left under this process's memory cgroup limit" if limited else "available memory"
    what = f"{where} {format_size(available)} minus a margin of {format_size(margin)}"
    if resident_bytes:
        what += f" and {format_size(resident_bytes)} of weights"
    return max(ram, 1), what
