"""ExpertCache: N slots of one memory tier, caching experts of the tier below.

Every tier above the disk is one of these (docs/design.md §9): the device's expert slots
(filled by copies from host RAM), and host RAM itself when the experts do not all fit
there (filled by reads from the checkpoint's files). The cache does not know which it
is: it asks its ``fill`` function to bring an expert into a slot and remembers the
returned event; whoever computes with the expert, or copies it further up, waits on that
event. It never knows which backend it runs on.

Bookkeeping, the same for every tier:

- a residency map, in least-recently-used order (oldest first);
- *pinned* experts, which a layer needs right now and which are never evicted;
- per slot, a *release* event: the last reader of the slot (a kernel on the compute
  stream, a copy up to the next tier, a CPU job), and the write in flight into it. A new
  fill of the slot starts only after both, so no copy or read races a reader or another
  write;
- the experts whose fill has not completed (``in_flight``), pruned as they land;
- eviction: least recently used unpinned expert, unless the policy gives a ``victim``
  function (the MoE-SpeQ scheduler's lookahead-aware choice).

Counters: lookups and hits per layer (kept by the executor), loads on demand and by
prefetch, prefetches that were used before eviction.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from moespeq_cli.runtime.backends.base import Backend, Event

Key = tuple[int, int]  # (layer, expert)
# fill(key, slot buffer, after, prefetch) -> the event of the expert's arrival in the slot
Fill = Callable[[Key, torch.Tensor, list[Event], bool], Event]


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0
    demand_loads: int = 0
    prefetches: int = 0
    prefetch_used: int = 0
    host_computed: int = 0  # lookups served by computing the expert on the CPU
    host_misses: int = 0  # ... of experts that had not arrived (not the resident ones it took to share work)
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
        """Of the experts used that were not in the cache beforehand, the share a prefetch
        brought: a miss served on the CPU counts as one no prefetch caught."""
        denom = self.prefetch_used + self.demand_loads + self.host_misses
        return self.prefetch_used / denom if denom and self.prefetches else None


@dataclass(frozen=True)
class ExpertLayout:
    """One expert's packed buffer: ``numel`` elements of ``dtype`` and the function that
    views it as (gate [I, H], up [I, H], down [H, I]). ``stride``: slots are that many
    page-aligned bytes each, and expert ``key`` starts ``shift(key)`` bytes into its slot
    (RAM slots that reads land in whole; 0: a slot is exactly one packed expert)."""

    numel: int
    dtype: torch.dtype
    views: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    stride: int = 0
    shift: Callable[[Key], int] | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty(0, dtype=self.dtype).element_size()


class ExpertCache:
    def __init__(
        self,
        name: str,
        slots: int,
        layout: ExpertLayout,
        backend: Backend,
        fill: Fill,
        device: torch.device | None = None,
        max_in_flight: int = 2,
    ):
        """``name``: the tier ("device", "host"); ``device``: where the slots' buffers
        live; ``max_in_flight``: how many prefetches a scheduler keeps queued on this
        tier's link at once (a read takes far longer than a copy, and the disk wants a
        few at a time)."""
        if slots < 1:
            raise ValueError(f"the {name} expert cache needs at least one slot")
        self.name, self.layout, self.backend, self._fill = name, layout, backend, fill
        self.device = device or torch.device("cpu")
        self.max_in_flight = max_in_flight
        self.nbytes = layout.nbytes
        self.slot_bytes = layout.stride or layout.nbytes  # what one slot takes in memory
        self.blocks: list[torch.Tensor] = []  # one per allocation: [n, numel], or n * stride bytes
        self.buffers: list[torch.Tensor] = []  # slot -> its memory
        self.owners: list = []  # block -> what holds its memory (its page-aligned mapping, or itself)
        self.slots = 0
        self.free_slots: list[int] = []
        self.slot_of: OrderedDict[Key, int] = OrderedDict()  # LRU order: oldest first
        self.arrival: dict[Key, Event] = {}
        self.release: dict[int, list[Event]] = {}  # slot -> events a new fill must wait for
        self.in_flight: set[Key] = set()  # fills not known to have completed
        self.pinned: set[Key] = set()
        self.prefetched: set[Key] = set()  # loaded by a prefetch and not used since
        self.stats = CacheStats()
        self.victim: Callable[[Iterator[Key]], Key | None] | None = None  # from LRU-first candidates
        self.on_block: Callable[[torch.Tensor, object], None] | None = None  # (block, owner): e.g. pin it
        self.grow(slots)

    def grow(self, n: int, after: Event | None = None) -> None:
        """Add ``n`` empty slots, in one new block (memory the draft gave back); ``after``:
        what a first fill of each must wait for (the compute stream's position when the
        draft's memory was freed: its last kernels may still read what was there)."""
        if n <= 0:
            return
        if self.layout.stride:
            from moespeq_cli.runtime.tiers.disk import aligned_bytes

            block, owner = aligned_bytes(n * self.layout.stride)
            regions = list(block.view(n, self.layout.stride).unbind(0))
        else:
            block = owner = torch.empty(n, self.layout.numel, dtype=self.layout.dtype, device=self.device)
            regions = list(block.unbind(0))
        if self.on_block is not None:
            self.on_block(block, owner)
        self.blocks.append(block)
        self.owners.append(owner)
        self.buffers.extend(regions)
        self.free_slots = list(range(self.slots + n - 1, self.slots - 1, -1)) + self.free_slots
        if after is not None:
            self.release.update((s, [after]) for s in range(self.slots, self.slots + n))
        self.slots += n

    def reset_stats(self) -> None:
        """Start counting afresh; what an earlier prefetch brought no longer counts."""
        self.stats = CacheStats()
        self.prefetched.clear()

    # -- residency ------------------------------------------------------------
    def resident(self, key: Key) -> bool:
        return key in self.slot_of

    def ready(self, key: Key) -> bool:
        if key not in self.slot_of:
            return False
        if key in self.in_flight:
            if not self.backend.ready(self.arrival[key]):
                return False
            self.in_flight.discard(key)
        return True

    def pending(self) -> int:
        """Fills still in flight (those that have landed are pruned)."""
        for key in [k for k in self.in_flight if self.backend.ready(self.arrival[k])]:
            self.in_flight.discard(key)
        return len(self.in_flight)

    def touch(self, key: Key) -> None:
        self.slot_of.move_to_end(key)

    def evictable(self) -> Iterator[Key]:
        """Resident experts not pinned, least recently used first; lazy: a caller after
        the first few does not walk every slot."""
        return (k for k in self.slot_of if k not in self.pinned)

    def can_load(self) -> bool:
        return bool(self.free_slots) or any(k not in self.pinned for k in self.slot_of)

    def _take_slot(self) -> tuple[int, list[Event]]:
        """A slot for a new expert, and what its fill must wait for."""
        if self.free_slots:
            slot = self.free_slots.pop()
            return slot, self.release.pop(slot, [])
        candidates = self.evictable()
        key = self.victim(candidates) if self.victim else next(candidates, None)
        if key is None:
            raise RuntimeError(
                f"every {self.name} expert slot is pinned; the plan gave fewer slots than one layer needs at once"
            )
        return self._evict(key)

    def _evict(self, key: Key) -> tuple[int, list[Event]]:
        slot = self.slot_of.pop(key)
        after = self.release.pop(slot, [])
        arrival = self.arrival.pop(key, None)
        if key in self.in_flight and arrival is not None and not self.backend.ready(arrival):
            after.append(arrival)  # a write still landing in the slot: the next one goes after it
        self.in_flight.discard(key)
        self.prefetched.discard(key)
        return slot, after

    def recover(self) -> None:
        """After a pass cut short, once what was in flight has settled: nothing pinned (a
        layer's pins were never taken off), every expert whose fill failed dropped (a read
        that raised: the slot holds no whole expert, yet the expert stayed resident, counted
        as a hit, and each use raised the old error again), failed events no longer waited
        for, and every slot no expert holds free (a fill that raised before its expert was
        recorded)."""
        self.pinned.clear()
        for key in [k for k, ev in self.arrival.items() if self.backend.failed(ev)]:
            self._evict(key)
        for slot in list(self.release):
            kept = [ev for ev in self.release[slot] if not self.backend.failed(ev)]
            if kept:
                self.release[slot] = kept
            else:
                del self.release[slot]
        held = set(self.slot_of.values())
        self.free_slots = [s for s in range(self.slots - 1, -1, -1) if s not in held]  # (popped lowest first)
        self.in_flight &= set(self.slot_of)
        self.prefetched &= set(self.slot_of)

    def evict_unpinned(self) -> None:
        for key in list(self.evictable()):
            slot, after = self._evict(key)
            self.free_slots.append(slot)
            if after:
                self.release[slot] = after

    def load(self, key: Key, prefetch: bool = False) -> Event:
        """Bring an expert into a slot (evicting if needed); returns its arrival event."""
        if key in self.slot_of:
            self.touch(key)
            return self.arrival[key]
        slot, after = self._take_slot()
        ev = self._fill(key, self.buffers[slot], after, prefetch)
        self.slot_of[key] = slot
        self.arrival[key] = ev
        self.in_flight.add(key)
        if prefetch:
            self.stats.prefetches += 1
            self.prefetched.add(key)
        else:
            self.stats.demand_loads += 1
        return ev

    def buffer(self, key: Key) -> torch.Tensor:
        """The expert's packed buffer (``numel`` elements of the layout's dtype)."""
        region = self.buffers[self.slot_of[key]]
        if not self.layout.stride:
            return region
        shift = self.layout.shift(key)
        return region[shift : shift + self.nbytes].view(self.layout.dtype)

    def weights(self, key: Key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.layout.views(self.buffer(key))

    def mark_used(self, key: Key, release: Event | None = None) -> None:
        """The compute stream has read the expert: a prefetch proved useful, and the slot
        is free for a new fill once the compute stream gets here (``release``: that point,
        recorded once for every expert a call read; else recorded now)."""
        if key in self.prefetched:
            self.prefetched.discard(key)
            self.stats.prefetch_used += 1
        self.hold(key, release if release is not None else self.backend.record_release())
        self.touch(key)

    def hold(self, key: Key, event: Event) -> None:
        """Something reads the expert's slot until ``event`` (a kernel, a copy up to the
        next tier, a CPU job): a new fill of the slot waits for it (and for every other
        reader not yet known to be done)."""
        slot = self.slot_of[key]
        self.release[slot] = [ev for ev in self.release.get(slot, []) if not self.backend.ready(ev)] + [event]

    def fill_slots(self, keys: list[Key], prefetch: bool = False) -> None:
        """Load ``keys`` into the free slots, never evicting."""
        for key in keys:
            if not self.free_slots:
                break
            if key not in self.slot_of:
                self.load(key, prefetch=prefetch)
