"""Stalls the governor can see on a backend whose waits are timed by events known only
once the device has passed them (CUDA): the scheduler folds them into ``io_stall_s`` at
each cycle's start and end, so every measured cycle carries its stall."""

import pytest
from offload_helpers import prompt_for, vram_for_slots

from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.runtime.backends.cuda import fold_stalls
from moespeq_cli.runtime.backends.mock import MockBackend
from moespeq_cli.runtime.engine import Engine, EngineOptions
from moespeq_cli.runtime.planning.planner import draft_bytes_estimate
from moespeq_cli.runtime.sampling import SamplingParams
from moespeq_cli.runtime.timeline import Timeline


class FakeEvent:
    def __init__(self, ms: float, done: bool = True):
        self.ms, self.done = ms, done

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, other: "FakeEvent") -> float:
        assert self.done and other.done, "elapsed_time on an event that has not completed"
        return other.ms - self.ms


def test_fold_stalls_takes_only_completed_pairs():
    base = FakeEvent(0.0)
    pairs = [
        (FakeEvent(1.0), FakeEvent(3.0), 0, 1, "wait H2D"),  # 2 ms, done
        (FakeEvent(5.0), FakeEvent(5.0), 0, 2, "wait H2D"),  # no stall
        (FakeEvent(6.0), FakeEvent(9.0, done=False), 1, 0, "wait H2D"),  # the GPU is not there yet
    ]
    timeline = Timeline()
    assert fold_stalls(base, pairs, timeline, done_only=True) == pytest.approx(0.002)
    assert len(pairs) == 1 and pairs[0][2] == 1  # the pending one stays
    assert [(iv.kind, iv.layer, iv.expert) for iv in timeline.intervals] == [("stall", 0, 1)]
    pairs[0][1].done = True
    assert fold_stalls(base, pairs, timeline, done_only=False) == pytest.approx(0.003)
    assert not pairs and len(timeline.intervals) == 2


class LateStallBackend(MockBackend):
    """A mock whose waits are known only later, as CUDA's are: ``wait`` records the stall
    aside and only ``resolve_stalls`` (or the end of the run) makes it count."""

    resolves = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.late = 0.0

    def wait(self, event, layer=None, expert=None, what="wait H2D"):
        before = self.io_stall_s
        super().wait(event, layer, expert, what)
        self.late += self.io_stall_s - before
        self.io_stall_s = before

    def resolve_stalls(self):
        if self.resolves:
            self.io_stall_s += self.late
            self.late = 0.0

    def finalize_timeline(self):
        self.io_stall_s += self.late
        self.late = 0.0


def governor_stalls(tiny, monkeypatch, resolves: bool) -> dict:
    import moespeq_cli.runtime.engine as engine_mod

    path, _ = tiny("mixtral", "gqa")
    ck = Checkpoint(path)

    def make(name, hw, capacity, reader=None):
        b = LateStallBackend(hw, capacity, reader)
        b.resolves = resolves
        return b

    monkeypatch.setattr(engine_mod, "make_backend", make)
    prompt = prompt_for(1)
    vram = vram_for_slots(path, ck.config.top_k + 1, len(prompt) + 24) + draft_bytes_estimate(ck.config)
    eng = Engine(path, EngineOptions(backend="mock", policy="moespeq", spec_depth="2", vram=vram))
    eng.load(len(prompt) + 24)
    assert isinstance(eng.backend, LateStallBackend)
    list(eng.generate(prompt, 24, SamplingParams()))
    assert eng.last_stats.io_stall_s > 0  # the run did stall
    return dict(eng.governor.state.stall)


def test_the_governor_sees_stalls_known_late(tiny, monkeypatch):
    stalls = governor_stalls(tiny, monkeypatch, resolves=True)
    assert stalls and max(stalls.values()) > 0
    # the same run with stalls left for the end of the run: the governor sees none (the bug)
    assert all(v == 0 for v in governor_stalls(tiny, monkeypatch, resolves=False).values())


def test_cuda_intervals_fold_as_the_gpu_passes_them():
    """Each cycle's timing events become timeline intervals once completed and are then
    dropped (a run holds one cycle's events, not the whole run's); the unfinished stay."""
    import threading

    from moespeq_cli.runtime.backends.cuda import CudaBackend

    b = object.__new__(CudaBackend)  # only the event bookkeeping: no GPU here
    b._base, b._pending_lock, b.timeline = FakeEvent(0.0), threading.Lock(), Timeline()
    b._pending = [
        ("compute", "compute", "attn", FakeEvent(1.0), FakeEvent(2.0), 0, None, 0, "target"),
        ("copy", "copy", "expert", FakeEvent(1.5), FakeEvent(4.0, done=False), 0, 3, 64, "target"),
    ]
    b._fold_pending(done_only=True)
    assert [(iv.name, iv.start, iv.end) for iv in b.timeline.intervals] == [("attn", 0.001, 0.002)]
    assert [p[2] for p in b._pending] == ["expert"]
    b._pending[0][4].done = True
    b._fold_pending(done_only=True)
    assert not b._pending and [iv.name for iv in b.timeline.intervals] == ["attn", "expert"]


def test_cuda_synchronize_waits_for_the_cpu_experts_jobs(monkeypatch):
    """``Engine.recover`` synchronizes before it mends the tiers: a CPU expert's job still
    running on the host pool would otherwise read a RAM slot that recovery hands back."""
    import threading
    import types
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from moespeq_cli.runtime.backends.cuda import CudaBackend

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    release, finished = threading.Event(), []
    backend = types.SimpleNamespace(
        reader=None,
        device=None,
        _issuer=ThreadPoolExecutor(max_workers=1),
        _host_pool=ThreadPoolExecutor(max_workers=1),
    )
    try:
        backend._host_pool.submit(lambda: (release.wait(5), finished.append(True)))
        threading.Timer(0.2, release.set).start()
        CudaBackend.synchronize(backend)
        assert finished == [True]
    finally:
        backend._issuer.shutdown()
        backend._host_pool.shutdown()
