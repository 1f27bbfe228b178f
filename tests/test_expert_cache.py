"""The expert cache every tier uses: LRU order, pinned experts are never evicted, a new
fill of a slot waits for the slot's readers and for the write still landing in it, the
counters; and the in-memory store the cpu reference computes from."""

import pytest
import torch

from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.runtime.backends.base import Event
from moespeq_cli.runtime.backends.mock import MockBackend
from moespeq_cli.runtime.planning.hardware import load_profile
from moespeq_cli.runtime.tiers.cache import ExpertCache, ExpertLayout
from moespeq_cli.runtime.tiers.store import ExpertStore

LAYOUT = ExpertLayout(12, torch.float32, lambda flat: (flat[:4].view(2, 2), flat[4:8].view(2, 2), flat[8:].view(2, 2)))


class Fills:
    """A fill function that records its calls and lands each expert at a chosen time."""

    def __init__(self):
        self.calls = []
        self.done_at = 1.0

    def __call__(self, key, dst, after, prefetch):
        dst.fill_(key[0] * 100 + key[1])
        self.calls.append((key, [ev.time for ev in after], prefetch))
        return Event(self.done_at)


@pytest.fixture
def fills():
    return Fills()


@pytest.fixture
def cache(fills):
    return ExpertCache("device", 3, LAYOUT, MockBackend(load_profile("t4-16gb"), 10**9), fills)


def test_lru_evicts_least_recently_used(cache):
    for e in (0, 1, 2):
        cache.load((0, e))
    cache.touch((0, 0))  # 1 is now the oldest
    cache.load((1, 5))
    assert not cache.resident((0, 1))
    assert all(cache.resident(k) for k in [(0, 0), (0, 2), (1, 5)])
    cache.load((1, 6))  # then 2
    assert not cache.resident((0, 2))
    assert float(cache.weights((1, 6))[0][0, 0]) == 106  # the slot holds what was filled


def test_pinned_experts_are_never_evicted(cache):
    for e in (0, 1, 2):
        cache.load((0, e))
    cache.pinned |= {(0, 0), (0, 1)}
    cache.load((1, 1))
    assert cache.resident((0, 0)) and cache.resident((0, 1)) and not cache.resident((0, 2))
    cache.pinned.add((1, 1))
    assert not cache.can_load()
    with pytest.raises(RuntimeError, match="pinned"):
        cache.load((1, 2))


def test_a_new_fill_waits_for_the_slots_reader_and_its_landing_write(cache, fills):
    cache.load((0, 0))
    cache.load((0, 1))
    cache.load((0, 2))
    cache.backend.t_compute = 2.0  # every fill (done at 1.0) has landed
    cache.mark_used((0, 0))  # its reader: the compute stream at 2.0
    cache.touch((0, 1))
    cache.touch((0, 2))
    cache.load((1, 0))  # evicts (0, 0): its fill must wait for that reader
    assert fills.calls[-1][1] == [2.0]
    fills.done_at = 9.0
    cache.load((1, 1))  # evicts (0, 1), whose fill has landed and which nobody read
    assert fills.calls[-1][1] == []
    cache.touch((0, 2))
    cache.touch((1, 0))
    cache.load((1, 2))  # evicts (1, 1): its write lands at 9.0, after the compute stream's 2.0
    assert fills.calls[-1][1] == [9.0]


def test_hold_keeps_every_reader_not_yet_done(cache, fills):
    cache.load((0, 0))
    cache.hold((0, 0), Event(5.0))  # a copy up to the next tier
    cache.hold((0, 0), Event(4.0))  # a CPU job
    for e in (1, 2):
        cache.load((0, e))
    cache.backend.t_compute = 1.5  # the fill (done at 1.0) has landed; neither reader is done
    cache.load((1, 0))  # evicts (0, 0)
    assert sorted(fills.calls[-1][1]) == [4.0, 5.0]


def test_counters_and_pending(cache, fills):
    cache.load((0, 3))
    cache.load((1, 4), prefetch=True)
    cache.load((1, 4))  # already resident: no second fill
    assert len(fills.calls) == 2 and fills.calls[1][2] is True
    assert cache.stats.demand_loads == 1 and cache.stats.prefetches == 1
    assert cache.pending() == 2 and not cache.ready((0, 3))
    cache.backend.t_compute = 1.0
    assert cache.pending() == 0 and cache.ready((0, 3))
    cache.mark_used((1, 4))
    assert cache.stats.prefetch_used == 1 and cache.stats.prefetch_precision == 1.0
    cache.reset_stats()  # a prefetch from before the reset no longer counts as used
    cache.load((1, 5), prefetch=True)
    assert cache.stats.prefetches == 1 and not cache.prefetched - {(1, 5)}


def test_grow_adds_empty_slots(cache):
    cache.grow(2)
    assert cache.slots == 5 and len(cache.free_slots) == 5 and len(cache.blocks) == 2
    for e in range(5):
        cache.load((0, e))
    assert len(cache.slot_of) == 5


def test_store_packs_checkpoint_experts(tiny):
    path, _ = tiny("qwen2_moe", "shared")
    ck = Checkpoint(path)
    store = ExpertStore(ck, ck.config.dtype)
    for layer in ck.config.moe_layers:
        for e in (0, ck.config.num_experts - 1):
            for a, b in zip(store.views(store.buffer(layer, e)), ck.expert(layer, e), strict=True):
                assert torch.equal(a, b)


def test_slots_the_draft_gave_back_wait_for_its_last_readers(cache, fills):
    """Slots added when the draft is released hold what was the draft's memory: a first
    fill of each waits for the compute stream's position at the release (the draft's
    last kernels), and a later fill no longer does."""
    for e in (0, 1, 2):
        cache.load((0, e))
    cache.grow(2, after=Event(4.0))
    assert cache.slots == 5
    cache.load((1, 0))
    cache.load((1, 1))
    assert [c[1] for c in fills.calls[-2:]] == [[4.0], [4.0]]
    cache.grow(1)  # at construction: nothing ran there before
    cache.load((1, 2))
    assert fills.calls[-1][1] == []
