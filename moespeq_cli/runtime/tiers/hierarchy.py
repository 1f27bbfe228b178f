"""ExpertTiers: the memory hierarchy of one run, disk -> host RAM -> device.

Each tier is an ``ExpertCache`` of the one below (docs/design.md §9):

- **disk**: the checkpoint's safetensors files (``DiskExperts``: every expert is a known
  extent, usually one read), read without the page cache;
- **host RAM** (``host``): ``plan.host_slots`` buffers in the checkpoint's dtype, filled
  by reads; all of the experts when they fit (then read once, at load), else a cache;
- **device** (``compute``): ``plan.slots`` buffers, filled by copies from host RAM; a copy
  of an expert that is not in RAM first reads it there, and the copy waits for the read.

On the cpu backend there is no device: host RAM is the compute tier (``compute`` is the
RAM cache, filled by reads, and ``host`` is None). Either way the executor computes from
``compute`` and the scheduler prefetches into it; it also reads experts into ``host`` ahead
of their copies (``staged`` says when one has landed), so the ELB's lookahead drives reads
further ahead than copies (a copy cannot start before its read has landed).
"""

from __future__ import annotations

import torch

from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.runtime.backends.base import Backend, Event
from moespeq_cli.runtime.planning.planner import Plan, spread
from moespeq_cli.runtime.tiers.cache import ExpertCache, Key
from moespeq_cli.runtime.tiers.disk import DiskExperts

COPIES_IN_FLIGHT = 2  # prefetch copies queued on the link at once (later ones can still overtake)


class ExpertTiers:
    def __init__(self, ckpt: Checkpoint, plan: Plan, backend: Backend):
        self.plan, self.backend = plan, backend
        self.disk = DiskExperts(ckpt)
        if backend.reader is not None:
            backend.reader.hold(self.disk.held)
        self.layout = self.disk.layout
        self.nbytes = self.disk.nbytes
        self.config = ckpt.config
        reads_in_flight = backend.reader.threads if backend.reader is not None else COPIES_IN_FLIGHT
        ram = self.disk.ram_layout  # whole pages a slot: reads land in place
        if plan.compute_tier == "host":
            self.host = None
            self.compute = ExpertCache("RAM", plan.slots, ram, backend, self._read, max_in_flight=reads_in_flight)
        else:
            self.host = ExpertCache("host", plan.host_slots, ram, backend, self._read, max_in_flight=reads_in_flight)
            if hasattr(backend, "pin"):
                for block, owner in zip(self.host.blocks, self.host.owners, strict=True):
                    backend.pin(block, owner)
                self.host.on_block = backend.pin
            self.compute = ExpertCache(
                "device",
                plan.slots,
                self.layout,
                backend,
                self._copy,
                device=backend.device,
                max_in_flight=COPIES_IN_FLIGHT,
            )

    # -- fills -----------------------------------------------------------------
    def _read(self, key: Key, dst: torch.Tensor, after: list[Event], prefetch: bool) -> Event:
        layer, e = key
        return self.backend.read(dst, self.disk.placements[key], self.nbytes, f"read L{layer}.E{e}", layer, e, after)

    def _copy(self, key: Key, dst: torch.Tensor, after: list[Event], prefetch: bool) -> Event:
        host = self.host
        host.stats.lookups += 1
        host.stats.hits += host.resident(key)
        src = host.load(key, prefetch=prefetch)  # a read first, when RAM does not hold it
        layer, e = key
        ev = self.backend.copy(dst, host.buffer(key), self.nbytes, f"H2D L{layer}.E{e}", layer, e, after=[*after, src])
        host.hold(key, ev)  # the host slot is not overwritten before the copy has read it
        return ev

    # -- the host tier's side -------------------------------------------------
    def staged(self, key: Key) -> bool:
        """The expert's bytes are in RAM, ready to be copied (always, on two tiers)."""
        return self.host is None or self.host.ready(key)

    def host_expert(self, key: Key) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], Event | None]:
        """The expert's host weights for the CPU to compute from, and the read that brings
        them (None when they are already there)."""
        if self.host is None:
            raise RuntimeError("no host tier: the CPU computes from the compute tier itself")
        ready = self.host.ready(key)
        ev = self.host.load(key)
        return self.host.weights(key), None if ready else ev

    @property
    def disk_tier(self) -> bool:
        return self.plan.disk_tier

    # -- start-up ---------------------------------------------------------------
    def preload(self) -> None:
        """Fill every tier before generation, the same experts per layer (lowest ids
        first) for every policy; the loads are not counted."""
        c = self.config
        layers = list(c.moe_layers)
        if self.host is not None:
            self.host.fill_slots(spread(self.host.slots, layers, c.num_experts))
            self.host.reset_stats()
        self.compute.fill_slots(spread(self.compute.slots, layers, c.num_experts))
        self.compute.reset_stats()

    def preload_host(self) -> None:
        """Only the host tier (a policy that keeps nothing on the device)."""
        if self.host is not None:
            c = self.config
            self.host.fill_slots(spread(self.host.slots, list(c.moe_layers), c.num_experts))
            self.host.reset_stats()

    def recover(self) -> None:
        """Every tier back to a consistent state after a pass cut short (``ExpertCache.recover``)."""
        for cache in (self.compute, self.host):
            if cache is not None:
                cache.recover()

    def reset_stats(self) -> None:
        self.compute.reset_stats()
        if self.host is not None:
            self.host.reset_stats()
