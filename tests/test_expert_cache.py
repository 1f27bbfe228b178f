"""The expert cache: LRU order, pinned experts are never evicted, the counters."""

import pytest

from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.runtime.backends.mock import MockBackend
from moespeq_cli.runtime.planning.hardware import load_profile
from moespeq_cli.runtime.tiers.cache import ExpertCache
from moespeq_cli.runtime.tiers.store import ExpertStore


@pytest.fixture
def cache(tiny):
    path, _ = tiny("mixtral", "top3")
    ck = Checkpoint(path)
    store = ExpertStore(ck, ck.config.dtype)
    return ExpertCache(store, MockBackend(load_profile("t4-16gb"), 10**9), slots=3)


def test_lru_evicts_least_recently_used(cache):
    for e in (0, 1, 2):
        cache.load((0, e))
    cache.touch((0, 0))  # 1 is now the oldest
    cache.load((1, 5))
    assert not cache.resident((0, 1))
    assert all(cache.resident(k) for k in [(0, 0), (0, 2), (1, 5)])
    cache.load((1, 6))  # then 2
    assert not cache.resident((0, 2))


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


def test_counters_and_weights(cache):
    cache.load((0, 3))
    cache.load((1, 4), prefetch=True)
    cache.load((1, 4))  # already resident: no second copy
    assert cache.stats.demand_loads == 1 and cache.stats.prefetches == 1
    cache.mark_used((1, 4))
    assert cache.stats.prefetch_used == 1 and cache.stats.prefetch_precision == 1.0
    assert cache.backend.bytes_h2d == 2 * cache.store.nbytes
    gate, up, down = cache.weights((0, 3))
    h, i = cache.store.config.hidden_size, cache.store.config.expert_intermediate
    assert gate.shape == (i, h) and up.shape == (i, h) and down.shape == (h, i)


def test_store_packs_checkpoint_experts(tiny):
    import torch

    path, _ = tiny("qwen2_moe", "shared")
    ck = Checkpoint(path)
    store = ExpertStore(ck, ck.config.dtype)
    for layer in ck.config.moe_layers:
        for e in (0, ck.config.num_experts - 1):
            for a, b in zip(store.views(store.buffer(layer, e)), ck.expert(layer, e), strict=True):
                assert torch.equal(a, b)
