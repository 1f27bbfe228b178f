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


@pytest.mark.parametrize("policy", ["moespeq", "lru"])
def test_a_run_s_virtual_time_does_not_depend_on_what_ran_before_it(policy):
    """Two engines in one process (as `bench` runs its policies) decode on the same
    virtual clock: the first pays nothing the second does not (the thread's scratch for
    widening bf16 weights, made once, was counted as an op of the first engine's first
    expert: `bench`'s first policy ran 3-5 us slower than the same policy later)."""
    from moespeq_cli.model_ref import DEMO_VRAM, resolve
    from moespeq_cli.runtime.engine import Engine, EngineOptions
    from moespeq_cli.runtime.executors import experts
    from moespeq_cli.runtime.sampling import SamplingParams

    experts._scratch.__dict__.clear()  # as in a fresh process
    _, path = resolve(None)
    runs = []
    for _ in range(2):
        eng = Engine(path, EngineOptions(vram=DEMO_VRAM, policy=policy))
        ids = eng.tokenizer.encode("First Citizen:\n")
        eng.load(len(ids) + 12)
        tokens = [ev.token for ev in eng.generate(ids, 12, SamplingParams())]
        ivs = [(iv.stream, iv.kind, iv.layer, iv.expert, iv.start, iv.end) for iv in eng.backend.timeline.intervals]
        runs.append((tokens, eng.last_stats.seconds, ivs))
        eng.close()
    assert runs[0] == runs[1]
