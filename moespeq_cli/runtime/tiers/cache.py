"""ExpertCache: N device slots for full-precision experts, a residency map, and eviction.

The cache is a small, backend-agnostic class: it asks the backend to copy an expert's
host buffer into a slot and remembers the copy's event; whoever computes with the expert
waits on that event. Experts are *pinned* while a layer needs them, and a pinned expert
is never evicted. Eviction picks the least recently used unpinned slot, unless the policy
gives a ``victim`` function (the MoE-SpeQ scheduler's lookahead-aware choice).

Counters: hits and lookups per layer, loads (demand vs prefetch), useful prefetches.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moespeq_cli.runtime.backends.base import Backend, Event
from moespeq_cli.runtime.tiers.store import ExpertStore

Key = tuple[int, int]  # (layer, expert)


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0
    demand_loads: int = 0
    prefetches: int = 0
    prefetch_used: int = 0
    host_computed: int = 0  # lookups served by computing the expert on the CPU
    layer_lookups: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    layer_hits: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.lookups if self.lookups else None

    @property
    def prefetch_precision(self) -> float | None:
        return self.prefetch_used / self.prefetches if self.prefetches else None

    @property
    def prefetch_recall(self) -> float | None:
        denom = self.prefetch_used + self.demand_loads
        return self.prefetch_used / denom if denom and self.prefetches else None


class ExpertCache:
    def __init__(self, store: ExpertStore, backend: Backend, slots: int):
        if slots < 1:
            raise ValueError("the expert cache needs at least one slot")
        self.store, self.backend, self.slots = store, backend, slots
        backend.alloc(slots * store.nbytes, "expert slots")
        self.device_buffers: list[torch.Tensor] = []  # cuda: one preallocated block per grow
        self.device_slots: list[torch.Tensor] | None = None  # cuda: slot -> its buffer
        if backend.name == "cuda":
            self.device_slots = []
            self._add_device_block(slots)
        self.slot_of: OrderedDict[Key, int] = OrderedDict()  # LRU order: oldest first
        self.free_slots = list(range(slots - 1, -1, -1))
        self.arrival: dict[Key, Event] = {}
        self.release: dict[int, Event] = {}  # slot -> last reader's event
        self.pinned: set[Key] = set()
        self.prefetched: set[Key] = set()  # loaded by a prefetch and not used since
        self.stats = CacheStats()
        self.victim: Callable[[list[Key]], Key] | None = None

    def _add_device_block(self, n: int) -> None:
        block = torch.empty(n, self.store.numel, dtype=self.store.dtype, device=self.backend.device)
        self.device_buffers.append(block)
        self.device_slots.extend(block.unbind(0))

    def grow(self, n: int) -> None:
        """Add ``n`` empty slots (memory the draft gave back)."""
        if n <= 0:
            return
        self.backend.alloc(n * self.store.nbytes, "expert slots")
        if self.device_slots is not None:
            self._add_device_block(n)
        self.free_slots = list(range(self.slots + n - 1, self.slots - 1, -1)) + self.free_slots
        self.slots += n

    # -- residency ------------------------------------------------------------
    def resident(self, key: Key) -> bool:
        return key in self.slot_of

    def ready(self, key: Key) -> bool:
        return key in self.slot_of and self.backend.ready(self.arrival[key])

    def touch(self, key: Key) -> None:
        self.slot_of.move_to_end(key)

    def _evictable(self) -> list[Key]:
        return [k for k in self.slot_of if k not in self.pinned]

    def can_load(self) -> bool:
        return bool(self.free_slots) or bool(self._evictable())

    def _take_slot(self) -> int:
        if self.free_slots:
            return self.free_slots.pop()
        candidates = self._evictable()
        if not candidates:
            raise RuntimeError("every expert slot is pinned; the plan gave fewer slots than one layer needs at once")
        key = self.victim(candidates) if self.victim else candidates[0]
        return self._evict(key)

    def _evict(self, key: Key) -> int:
        slot = self.slot_of.pop(key)
        self.arrival.pop(key, None)
        self.prefetched.discard(key)
        return slot

    def evict_unpinned(self) -> None:
        for key in self._evictable():
            self.free_slots.append(self._evict(key))

    def load(self, key: Key, prefetch: bool = False) -> Event:
        """Copy an expert into a slot (evicting if needed); returns its arrival event."""
        if key in self.slot_of:
            self.touch(key)
            return self.arrival[key]
        slot = self._take_slot()
        layer, expert = key
        dst = self.device_slots[slot] if self.device_slots is not None else None
        ev = self.backend.copy(
            dst,
            self.store.buffer(layer, expert),
            self.store.nbytes,
            f"H2D L{layer}.E{expert}",
            layer,
            expert,
            after=self.release.get(slot),
        )
        self.slot_of[key] = slot
        self.arrival[key] = ev
        if prefetch:
            self.stats.prefetches += 1
            self.prefetched.add(key)
        else:
            self.stats.demand_loads += 1
        return ev

    def weights(self, key: Key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.device_slots is not None:
            return self.store.views(self.device_slots[self.slot_of[key]])
        return self.store.views(self.store.buffer(*key))  # mock: numerics from the host copy

    def mark_used(self, key: Key) -> None:
        if key in self.prefetched:
            self.prefetched.discard(key)
            self.stats.prefetch_used += 1
        self.release[self.slot_of[key]] = self.backend.record_release()
        self.touch(key)

    def fill(self, prefetch: bool = False) -> None:
        """Copy experts into the free slots (never evicting): every expert if they fit,
        else the same number per layer, lowest ids first (no routing statistics are
        assumed)."""
        from moespeq_cli.runtime.planning.planner import spread

        c = self.store.config
        for key in spread(self.slots, list(c.moe_layers), c.num_experts):
            if not self.free_slots:
                break
            if key not in self.slot_of:
                self.load(key, prefetch=prefetch)

    def preload_all(self) -> None:
        """Fill the slots before generation; the copies are not counted."""
        self.fill()
        self.stats = CacheStats()
