"""The Expert Lookahead Buffer (ELB) scheduler: MoE-SpeQ's prefetching side.

While the draft generates k tokens, every draft router decision (token i, layer l) ->
expert ids is recorded in the ELB; it is the k x L table of what the coming verification
will need. The scheduler turns ELB entries into copies of the target's full-precision
experts that are not resident:

- phase I: experts already resident are reused (and protected from eviction);
- phase II: while the draft runs, predicted experts are queued by (layer, token) -- the
  order verification needs them -- and issued as the link drains (at most the tier's
  ``max_in_flight`` transfers queued at once, so a late prediction for an early layer can
  still overtake an early prediction for a late layer);
- phase III: once the draft is complete, everything still queued is issued, layer first.

With a disk tier below host RAM, a predicted expert that RAM does not hold is first
*staged*: read into RAM, from a queue of its own in the same order, as the disk drains.
Its copy is issued once the read has landed (a copy issued earlier would hold the
in-order copy stream until the read is done; the copies behind it whose reads have
landed go first); in phase III everything goes, the copies behind their reads. On the cpu backend RAM is the compute tier and its loads are the
reads themselves.

Eviction is lookahead-aware: an expert the ELB says this verification needs (at a layer
not yet verified) is never evicted for a prefetch; among the rest the least recently
used goes first. Verification loads on demand whatever the prediction missed; if a
demand load finds only protected experts, the one needed farthest ahead (highest layer)
is evicted. With k = 0 the target decodes alone, with gate-prefetch or without it (plain
LRU), whichever the governor measures faster (``governor.prefetch``).
"""

from __future__ import annotations

import heapq

from moespeq_cli.runtime.backends.base import Backend
from moespeq_cli.runtime.executors.offload import OffloadedExperts
from moespeq_cli.runtime.scheduling.governor import Governor
from moespeq_cli.runtime.speculative import SpecHooks
from moespeq_cli.runtime.tiers.cache import ExpertCache, Key
from moespeq_cli.runtime.tiers.hierarchy import ExpertTiers

SCAN_PAST = 16  # queued copies a pump looks past while their reads land (the queue stays cheap to pump)


class ElbScheduler(SpecHooks):
    def __init__(self, model, tiers: ExpertTiers, backend: Backend, target: OffloadedExperts, governor: Governor):
        self.model, self.tiers, self.backend, self.target, self.governor = model, tiers, backend, target, governor
        self.cache = tiers.compute
        self.first_moe = min(model.moe_blocks)
        self.elb: list[dict[int, set[int]]] = []  # draft token -> layer -> expert ids
        self.queue: list[tuple[int, int, int]] = []  # loads into the compute tier: (layer, token, expert)
        self.stage_queue: list[tuple[int, int, int]] = []  # reads into host RAM ahead of their copies
        self.protected: set[Key] = set()
        self.verify_layer = -1
        self.verify_routes: list[dict[int, set[int]]] = []
        self.snapshot: set[Key] = set()
        self.match_pairs = 0
        self.match_equal = 0
        self.on_release = None  # called once when the governor gives the draft's memory back
        self.cache.victim = self.victim
        if tiers.host is not None:
            tiers.host.victim = self.victim
        target.layer_hook = self.on_verify_layer

    # -- eviction -----------------------------------------------------------
    def _needed_later(self, key: Key) -> bool:
        return key in self.protected and key[0] >= self.verify_layer

    def victim(self, candidates) -> Key | None:
        """The least recently used candidate not needed later in this verification, else
        the one needed farthest ahead (``candidates``: LRU first, walked only as far as
        needed)."""
        farthest = None
        for key in candidates:
            if not self._needed_later(key):
                return key
            if farthest is None or key[0] > farthest[0]:
                farthest = key
        return farthest

    def _prefetch_room(self, cache: ExpertCache) -> bool:
        return bool(cache.free_slots) or any(not self._needed_later(k) for k in cache.evictable())

    # -- phases -------------------------------------------------------------
    def begin_prefill(self) -> None:
        # A prompt's lookahead predicts nearly every expert of the next layer (the union
        # over its tokens). Copy-only, they are all copied anyway: gate-prefetch starts
        # them a layer early. With CPU experts, copying them all takes the link from the
        # per-expert choice of path (``OffloadedExperts.choose_paths``), which decides alone.
        self.target.gate_prefetch = not self.target.policy.host_compute
        self.model.set_router_observer(None)

    def reset(self) -> None:
        """No cycle's queues, lookahead or protected experts (a cycle starts, or one was cut short)."""
        self.k = 0
        self.elb = []
        self.queue = []
        self.stage_queue = []
        self.protected = set()
        self.verify_layer = -1
        self.model.set_router_observer(None)

    def begin_cycle(self, k: int) -> None:
        self.reset()
        self.k = k
        self.snapshot = set(self.cache.slot_of)
        self.t_start = self.backend.now()
        if self.governor.release_requested and self.on_release is not None:
            self.on_release()
            self.on_release = None
        self.target.gate_prefetch = k == 0 and self.governor.prefetch
        self.model.set_router_observer(self.on_draft_route if k else None)
        self.backend.phase = "draft" if k else "target"

    def on_draft_route(self, layer: int, rows: list[list[int]]) -> None:
        if layer == self.first_moe:
            self.elb.append({})
        token = len(self.elb) - 1
        chosen = set(rows[0])
        self.elb[token][layer] = chosen
        for e in sorted(chosen):
            key = (layer, e)
            if key in self.protected:
                continue
            self.protected.add(key)
            if self.cache.resident(key):
                self.cache.touch(key)  # phase I: reuse
                continue
            heapq.heappush(self.queue, (layer, token, e))
            host = self.tiers.host
            if host is not None and not host.resident(key):
                heapq.heappush(self.stage_queue, (layer, token, e))
            elif host is not None:
                host.touch(key)
        self.pump()

    def pump(self, everything: bool = False) -> None:
        """Issue queued reads and loads, layer first: a few at a time while the draft runs
        (phase II), all of them once it is done (``everything``: phase III)."""
        host, cache = self.tiers.host, self.cache
        if host is not None and self.stage_queue:
            in_flight = host.pending()
            while self.stage_queue and (everything or in_flight < host.max_in_flight) and self._prefetch_room(host):
                layer, _, e = heapq.heappop(self.stage_queue)
                key = (layer, e)
                if host.resident(key) or cache.resident(key):
                    continue
                host.load(key, prefetch=True)
                in_flight += 1
        in_flight = cache.pending()
        waiting = []  # copies whose read has not landed: issued now they would hold the copy stream
        while self.queue and (everything or in_flight < cache.max_in_flight) and self._prefetch_room(cache):
            item = heapq.heappop(self.queue)
            key = (item[0], item[2])
            if cache.resident(key):
                continue
            if not everything and not self.tiers.staged(key):
                waiting.append(item)
                if len(waiting) >= SCAN_PAST:
                    break
                continue
            cache.load(key, prefetch=True)
            in_flight += 1
        for item in waiting:
            heapq.heappush(self.queue, item)

    def begin_verify(self, k: int) -> None:
        self.backend.phase = "target"
        self.t_verify = self.backend.now()
        self.backend.resolve_stalls()  # the draft phase's stalls are not this verification's
        self.stall_before = self.backend.io_stall_s
        self.pump(everything=True)  # phase III: the rest, layer first
        self.verify_routes = [{} for _ in range(k + 1)]
        self.needed: set[Key] = set()
        self.model.set_router_observer(self.on_verify_route)

    def on_verify_layer(self, layer: int) -> None:
        self.verify_layer = layer

    def on_verify_route(self, layer: int, rows: list[list[int]]) -> None:
        for i, row in enumerate(rows):
            if i < len(self.verify_routes):
                self.verify_routes[i][layer] = set(row)
            self.needed.update((layer, e) for e in row)

    def end_cycle(self, k: int, accepted: int, recomputed: bool = False) -> None:
        """``recomputed``: the cycle's pass re-encoded the whole sequence (LongRoPE's
        switch): its time and misses are not a cycle's, and the governor does not learn
        from them."""
        self.model.set_router_observer(None)
        now = self.backend.now()
        self.backend.resolve_stalls()  # on CUDA, stalls are known once the GPU has passed them
        stall = self.backend.io_stall_s - self.stall_before
        target_s = max(0.0, now - self.t_verify - stall)
        draft_s = self.t_verify - self.t_start
        misses = len(self.needed - self.snapshot)
        for i in range(min(k, len(self.elb))):
            for layer, chosen in self.elb[i].items():
                self.match_pairs += 1
                self.match_equal += chosen == self.verify_routes[i].get(layer)
        if not recomputed and self.k == k and self.verify_routes and len(self.verify_routes) == k + 1:
            self.governor.observe(k, accepted, draft_s, target_s, misses, stall)
        self.protected = set()

    @property
    def draft_routing_match(self) -> float | None:
        return self.match_equal / self.match_pairs if self.match_pairs else None
