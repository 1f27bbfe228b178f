"""The host tier's page-locked memory (backends/host_registry.py), on the CPU with a fake
CUDA runtime that refuses, as the driver does, to register a range twice: exactly the
host tier's bytes are registered, and each registration is undone once, at close or when
its memory goes (the first GPU run failed every engine after the first in a process)."""

import gc
from types import SimpleNamespace

import pytest
import torch

from moespeq_cli.runtime.backends.host_registry import HostRegistry
from moespeq_cli.runtime.tiers.cache import ExpertCache

ALREADY_REGISTERED = 712  # cudaErrorHostMemoryAlreadyRegistered


def mapped(ptr: int) -> bool:
    """``ptr`` lies in one of this process's mappings."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


class FakeCudart:
    def __init__(self):
        self.ranges: dict[int, int] = {}  # pointer -> bytes registered
        self.last_error = 0
        self.syncs = 0
        self.mapped_when_undone: list[bool] = []

    def cudaHostRegister(self, ptr, nbytes, flags):
        if any(p < ptr + nbytes and ptr < p + n for p, n in self.ranges.items()):
            self.last_error = ALREADY_REGISTERED
            return ALREADY_REGISTERED
        self.ranges[ptr] = nbytes
        return 0

    def cudaHostUnregister(self, ptr):
        assert ptr in self.ranges, "unregistered twice, or never registered"
        self.mapped_when_undone.append(mapped(ptr))
        del self.ranges[ptr]
        return 0

    def cudaGetLastError(self):
        err, self.last_error = self.last_error, 0
        return err

    def cudaGetErrorString(self, rc):
        return "part or all of the requested memory range is already mapped"


@pytest.fixture
def cudart():
    return FakeCudart()


@pytest.fixture
def registry(cudart):
    return HostRegistry(cudart, synchronize=lambda: setattr(cudart, "syncs", cudart.syncs + 1))


def host_cache(registry, slots=3, stride=3 * 4096):
    """A host tier as ExpertTiers builds one: page-aligned slots, each new block pinned."""
    layout = SimpleNamespace(stride=stride, nbytes=stride - 100, numel=stride - 100, dtype=torch.uint8)
    cache = ExpertCache("host", slots, layout, backend=None, fill=None)
    for block, owner in zip(cache.blocks, cache.owners, strict=True):
        registry.register(block, owner)
    cache.on_block = registry.register
    return cache


def test_exactly_the_host_tiers_bytes_are_registered(registry, cudart):
    cache = host_cache(registry, slots=3)
    cache.grow(2)  # memory the draft gave back
    assert sorted(cudart.ranges.values()) == [2 * 3 * 4096, 3 * 3 * 4096]  # no power-of-two rounding
    assert registry.bytes == 5 * 3 * 4096
    assert all(ptr % 4096 == 0 for ptr in cudart.ranges)


def test_close_undoes_each_registration_once(registry, cudart):
    cache = host_cache(registry)
    registry.close()
    assert cudart.ranges == {} and registry.bytes == 0 and cudart.syncs == 1
    registry.close()
    del cache
    gc.collect()  # the memory going after close: nothing to undo twice (the fake would raise)


def test_an_engine_dropped_without_close_leaves_no_registration_behind(registry, cudart):
    cache = host_cache(registry)
    view = cache.buffers[0][:10]  # a copy's source may outlive the cache: the memory stays registered
    del cache
    gc.collect()
    assert len(cudart.ranges) == 1
    del view
    gc.collect()
    assert cudart.ranges == {} and cudart.syncs == 1
    assert cudart.mapped_when_undone == [True]  # undone before the memory was unmapped, not after
    again = host_cache(registry)  # a new host tier, possibly at the same addresses, registers
    assert len(cudart.ranges) == 1 and again.blocks


def test_only_page_mappings_are_registered(registry, cudart):
    """A tensor's own lifetime cannot say when its memory goes (views outlive it)."""
    block = torch.empty(4096, dtype=torch.uint8)
    with pytest.raises(TypeError, match="PageMapping"):
        registry.register(block, block)
    assert cudart.ranges == {}


def test_a_failed_registration_is_reported_and_cleared(registry, cudart):
    cache = host_cache(registry)
    with pytest.raises(RuntimeError, match=r"cudaHostRegister of 36864 bytes failed \(part or all.*lower --ram"):
        registry.register(cache.blocks[0], cache.owners[0])  # the same range again
    assert cudart.last_error == 0  # torch would otherwise blame the next kernel launch
    assert registry.bytes == 3 * 3 * 4096
