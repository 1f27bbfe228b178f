"""The mock backend's discrete-event clock has CUDA stream semantics."""

import pytest

from moespeq_cli.runtime.backends.base import DeviceMemoryError, Event
from moespeq_cli.runtime.backends.mock import MockBackend
from moespeq_cli.runtime.planning.costs import Cost
from moespeq_cli.runtime.planning.hardware import load_profile

HW = load_profile("rtx3060-12gb")


def backend(capacity=10**9):
    return MockBackend(HW, capacity)


def copy_seconds(nbytes):
    return HW.link_latency + nbytes / HW.link_bandwidth


def compute(b, flops):
    t = b.begin()
    b.end(t, Cost(flops, 0.0, kernels=0), "op")


def test_copy_and_compute_overlap():
    b = backend()
    ev = b.copy(None, None, 10**8, "c", 0, 0)
    compute(b, HW.peak_flops * 0.001)  # 1 ms of compute while the copy runs
    assert b.now() == pytest.approx(0.001)
    assert ev.time == pytest.approx(copy_seconds(10**8))
    copies = [iv for iv in b.timeline.intervals if iv.kind == "copy"]
    computes = [iv for iv in b.timeline.intervals if iv.kind == "compute"]
    assert copies[0].start == 0.0 and computes[0].start == 0.0  # both started at once


def test_wait_delays_exactly_until_the_event():
    b = backend()
    ev = b.copy(None, None, 10**8, "c", 0, 0)
    compute(b, HW.peak_flops * 0.001)
    b.wait(ev)
    assert b.now() == pytest.approx(ev.time)
    assert b.io_stall_s == pytest.approx(ev.time - 0.001)
    before = b.now()
    b.wait(Event(before - 1.0))  # an event in the past costs nothing
    assert b.now() == before and b.io_stall_s == pytest.approx(ev.time - 0.001)


def test_streams_are_in_order():
    b = backend()
    e1 = b.copy(None, None, 10**8, "c1", 0, 0)
    e2 = b.copy(None, None, 10**8, "c2", 0, 1)
    assert e2.time == pytest.approx(e1.time + copy_seconds(10**8))  # the second waits for the first
    compute(b, HW.peak_flops * 0.002)
    compute(b, HW.peak_flops * 0.003)
    spans = [iv for iv in b.timeline.intervals if iv.kind == "compute"]
    assert spans[1].start == pytest.approx(spans[0].end)


def test_copy_is_issued_at_the_compute_streams_time_and_after_slot_release():
    b = backend()
    compute(b, HW.peak_flops * 0.004)
    ev = b.copy(None, None, 1000, "c", 0, 0)
    assert ev.time == pytest.approx(0.004 + copy_seconds(1000))
    late = b.copy(None, None, 1000, "c", 0, 1, after=Event(0.01))
    assert late.time == pytest.approx(0.01 + copy_seconds(1000))


def test_roofline_cost():
    c = Cost(flops=HW.peak_flops * 1e-3, bytes=HW.mem_bandwidth * 2e-3, kernels=2)
    assert c.seconds(HW) == pytest.approx(2e-3 + 2 * HW.launch_overhead)


def test_memory_budget_raises_the_planners_error():
    b = backend(capacity=1000)
    b.alloc(600, "weights")
    with pytest.raises(DeviceMemoryError, match="out of device memory"):
        b.alloc(500, "expert slots")
    b.free(600, "weights")
    b.alloc(900, "expert slots")
