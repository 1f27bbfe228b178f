"""Hybrid execution: experts computed on the CPU from host memory (policy ``hybrid``, and
moespeq choosing copy or CPU per expert) are lossless, and the choice follows the cost
model: a slower link moves experts to the CPU, a faster one moves them back."""

import re

import pytest
from offload_helpers import FAMILIES, prompt_for, run_engine, vram_for_slots

from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.runtime.engine import Engine, EngineOptions
from moespeq_cli.runtime.planning.hardware import profiles_dir
from moespeq_cli.runtime.sampling import SamplingParams
from moespeq_cli.runtime.scheduling.governor import GovernorState


@pytest.fixture
def link(tmp_path):
    """link(bandwidth) -> a copy of the desktop profile with that link bandwidth (B/s)."""

    def make(bandwidth: float, host_mem_bandwidth: float | None = None) -> str:
        text = (profiles_dir() / "desktop-3060-ddr4.yaml").read_text()
        text = re.sub(r"(?m)^link_bandwidth:.*$", f"link_bandwidth: {bandwidth:g}", text)
        if host_mem_bandwidth is not None:
            text = re.sub(r"(?m)^host_mem_bandwidth:.*$", f"host_mem_bandwidth: {host_mem_bandwidth:g}", text)
        out = tmp_path / f"link-{bandwidth:g}-{host_mem_bandwidth}.yaml"
        out.write_text(text)
        return str(out)

    return make


def engine(path, policy, slots, context, hardware, **kw):
    eng = Engine(
        path,
        EngineOptions(
            backend="mock",
            policy=policy,
            vram=vram_for_slots(path, slots, context, policy=policy),
            hardware=hardware,
            draft_verdict=False,  # the governor decides (tests/test_draft_verdict.py: the plan's verdict)
            **kw,
        ),
    )
    eng.load(context)
    return eng


def generate(eng, prompt, n):
    return [ev.token for ev in eng.generate(prompt, n, SamplingParams())]


@pytest.mark.parametrize("family,variant", FAMILIES)
def test_hybrid_and_moespeq_with_cpu_are_lossless(tiny, link, family, variant):
    path, _ = tiny(family, variant)
    prompt = prompt_for(4)
    n = 20
    expected, _ = run_engine(path, prompt, n, backend="cpu")
    cfg = Checkpoint(path).config
    slow = link(2e8)  # a slow link: the CPU wins for most misses
    for policy, k in (("hybrid", "auto"), ("moespeq", "2"), ("moespeq", "auto")):
        for slots in (cfg.top_k + 1, cfg.num_experts * len(cfg.moe_layers) // 2):
            eng = engine(path, policy, slots, len(prompt) + n, slow, spec_depth=k)
            assert generate(eng, prompt, n) == expected, (policy, k, slots)
            assert eng.last_stats.cpu_expert_share > 0, (policy, k, slots)


def test_hybrid_never_copies_while_decoding(tiny):
    path, _ = tiny("mixtral", "top3")
    prompt = prompt_for(5)
    cfg = Checkpoint(path).config
    total = cfg.num_experts * len(cfg.moe_layers)
    eng = engine(path, "hybrid", 6, len(prompt) + 24, "desktop-3060-ddr4")
    generate(eng, prompt, 24)
    s = eng.last_stats
    assert s.bytes_h2d == 0  # the static cache was filled before generation
    assert s.cpu_expert_share == pytest.approx(1 - s.expert_hit_rate)
    per_layer = {}
    for layer, _e in eng.cache.slot_of:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    assert sorted(per_layer.values()) == [3, 3] and total == 16  # spread evenly over the layers


def cpu_share(path, hardware, prompt, policy="moespeq"):
    eng = engine(path, policy, 4, len(prompt) + 24, hardware, spec_depth="2")
    generate(eng, prompt, 24)
    return eng.last_stats.cpu_expert_share


def test_link_bandwidth_moves_experts_between_copy_and_cpu(tiny, link):
    path, _ = tiny("mixtral", "top3")
    prompt = prompt_for(6)
    shares = [cpu_share(path, link(bw), prompt) for bw in (1e8, 1e9, 1e10, 1e12)]
    assert shares[0] > 0.5  # slow link: most misses on the CPU
    # a fast link copies more; not most: a copied expert waits for the device, which
    # computes the layer's resident experts first, and the CPU finishes a tiny expert sooner
    assert shares[-1] < shares[0] - 0.15
    assert all(a >= b for a, b in zip(shares, shares[1:], strict=False)), shares
    assert cpu_share(path, link(1e12, host_mem_bandwidth=1e6), prompt) == 0.0  # a hopeless CPU: none
    # ... and back: the same slow profile again gives the same choice
    assert cpu_share(path, link(1e8), prompt) == shares[0]


def test_chosen_path_is_the_fastest_and_the_model_is_exact(tiny, link):
    """Every decision takes the alternative with the earliest modelled finish, and on the
    mock clock the modelled finish of a CPU job is exactly when its output arrives."""
    path, _ = tiny("olmoe", "base")
    prompt = prompt_for(7)
    eng = engine(path, "moespeq", 3, len(prompt) + 16, link(3e8), spec_depth="2")
    eng.target_exec.decisions = []
    arrivals = []
    host_compute = eng.backend.host_compute

    def spy(x, fn, cost, act, name, layer=None, expert=None, after=None):
        job = host_compute(x, fn, cost, act, name, layer, expert, after)
        if name.startswith("cpu expert"):
            arrivals.append((layer, expert, job.event.time))
        return job

    eng.backend.host_compute = spy
    generate(eng, prompt, 16)
    decisions = eng.target_exec.decisions
    assert decisions and any(c == "cpu" for *_, c in decisions) and any(c == "copy" for *_, c in decisions)
    for _layer, _e, alternatives, choice in decisions:
        assert choice == min(alternatives, key=lambda p: (alternatives[p], p != "copy"))
    modelled = [(layer, e, alt["cpu"]) for layer, e, alt, c in decisions if c == "cpu"]
    assert [(a, b) for a, b, _ in modelled] == [(a, b) for a, b, _ in arrivals]
    for (_, _, m), (_, _, actual) in zip(modelled, arrivals, strict=True):
        assert m == pytest.approx(actual, rel=1e-12, abs=1e-15)


def test_a_copied_expert_is_done_when_the_device_has_computed_it(tiny, link):
    """The copy's alternative ends when the device has computed the expert, not when the
    copy lands: it is never later than the computation on the mock's clock, and equal to
    it where the device waited for the copy. Without the device's part, a CPU job that
    finishes between the landing and the computation would lose to the copy."""
    path, _ = tiny("olmoe", "base")
    prompt = prompt_for(7)
    eng = engine(path, "moespeq", 3, len(prompt) + 16, link(3e8), spec_depth="2")
    eng.target_exec.decisions = []
    generate(eng, prompt, 16)
    o = eng.backend.origin
    computed = {}  # (layer, expert) -> ends of its computations on the device
    for iv in eng.backend.timeline.intervals:
        if iv.stream == "compute" and iv.kind == "compute" and iv.name.startswith("expert L"):
            computed.setdefault((iv.layer, iv.expert), []).append(iv.end + o)
    copies = [(layer, e, alt["copy"]) for layer, e, alt, c in eng.target_exec.decisions if c == "copy"]
    assert copies
    exact = 0
    for layer, e, modelled in copies:
        end = min(t for t in computed[(layer, e)] if t >= modelled - 1e-12)
        exact += end == pytest.approx(modelled, rel=1e-12, abs=1e-15)
    assert exact, "the device never waited for a copy: the test shows nothing"


@pytest.mark.parametrize("cpu_experts", [False, True])
def test_the_prompt_is_gate_prefetched_only_without_cpu_experts(tiny, link, cpu_experts):
    """A prompt's lookahead predicts nearly every expert of the next layer: copy-only they
    are all copied anyway and gate-prefetch starts them early; with CPU experts the choice
    of path per expert decides, and the link is not filled ahead of it."""
    path, _ = tiny("mixtral", "top3")
    prompt = prompt_for(8)
    eng = engine(path, "moespeq", 6, len(prompt) + 4, link(3e8), spec_depth="0", cpu_experts=cpu_experts)
    passes, looking, prefetched = [0], [], []  # (pass, gate-prefetch on) at each MoE layer; passes prefetching
    eng.model.register_forward_pre_hook(lambda *a: passes.__setitem__(0, passes[0] + 1))
    target, hook, prefetch = eng.target_exec, eng.target_exec.layer_hook, eng.target_exec.prefetch_next
    target.layer_hook = lambda layer: (looking.append((passes[0], target.gate_prefetch)), hook and hook(layer))
    target.prefetch_next = lambda *a: (prefetched.append(passes[0]), prefetch(*a))[1]
    generate(eng, prompt, 4)
    in_prompt = {on for p, on in looking if p == 1}  # the prompt's pass is the first
    assert in_prompt == {not cpu_experts}
    if cpu_experts:
        assert 1 not in prefetched


def test_governor_counts_the_cpu_path():
    """A CPU path faster than the link makes plain decoding's misses cheaper; without
    acceptance, k = 0 stays the choice."""
    kw = dict(k_max=4, num_experts=8, top_k=2, t_copy=1e-3)
    copy_only = GovernorState(**kw)
    with_cpu = GovernorState(**kw, t_host=lambda n: 2e-4 + 1e-5 * n)
    for s in (copy_only, with_cpu):
        s.t_target = {1: 1e-3, 2: 1.1e-3, 3: 1.2e-3, 4: 1.3e-3, 5: 1.4e-3}
        s.misses = {1: 4.0}
        s.t_draft = 8e-4
    assert with_cpu.cycle_time(0) < copy_only.cycle_time(0)
    # 4 misses served by link and CPU together: 4 / (1/1e-3 + 1/2.1e-4) s on top of the pass
    assert with_cpu.cycle_time(0) == pytest.approx(1e-3 + 4 / (1 / 1e-3 + 1 / 2.1e-4))
    for s in (copy_only, with_cpu):
        s.p = [0.0] * 4
        s.tested = [5] * 4
        assert s.best_k() == 0


def test_hybrid_refuses_no_cpu_experts(tiny, cli):
    path, _ = tiny("mixtral", "gqa")
    r = cli("run", str(path), "--backend", "mock", "--policy", "hybrid", "--no-cpu-experts", "-n", "2")
    assert r.exit_code == 2 and "hybrid" in r.stderr
    r = cli("run", str(path), "--backend", "mock", "--policy", "lru", "--cpu-experts", "-n", "2")
    assert r.exit_code == 2 and "--cpu-experts" in r.stderr


@pytest.mark.parametrize(
    "policy, asked, expect_note", [("hybrid", None, True), ("lru", None, False), ("hybrid", 1, False)]
)
def test_cpu_experts_beside_a_gpu_leave_a_core_for_launches(tiny, monkeypatch, policy, asked, expect_note):
    """On cuda with experts on the host, torch's pool defaults to cores minus one (the
    launching thread keeps a core) and the plan line says so; --cpu-threads overrides."""
    import os

    import torch

    import moespeq_cli.runtime.engine as engine_mod

    path, _ = tiny("mixtral", "gqa")
    monkeypatch.setattr(engine_mod, "resolve_backend_name", lambda name: "cuda")  # no GPU needed before load
    before = torch.get_num_threads()
    try:
        eng = Engine(path, EngineOptions(backend="cuda", hardware="rtx3060-12gb", policy=policy, cpu_threads=asked))
        assert (eng.threads_note is not None) == expect_note
        if expect_note:
            assert torch.get_num_threads() == max(1, (os.cpu_count() or 2) - 1)
            assert "--cpu-threads" in eng.threads_note
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("launch,moved", [(2e-4, True), (1e-7, False)])
def test_resident_experts_go_to_the_cpu_where_the_device_s_launches_set_the_layer_s_time(tiny, tmp_path, launch, moved):
    """Every expert resident (no copies): with launches that make a device expert slower
    than the CPU's (experts one by one, about ten launches each) moespeq's CPU experts
    take the last resident experts of a layer, each one the CPU finishes before the
    device would end the layer, and decoding is faster on the mock clock than with the
    device alone; with cheap launches every expert stays (and the run is no slower).
    Tokens unchanged."""
    path, _ = tiny("olmoe", "base")
    cfg = Checkpoint(path).config
    text = (profiles_dir() / "desktop-3060-ddr4.yaml").read_text()
    hw = tmp_path / "launch.yaml"
    hw.write_text(re.sub(r"(?m)^launch_overhead:.*$", f"launch_overhead: {launch:g}", text))
    prompt = prompt_for(9)
    expected, _ = run_engine(path, prompt, 12, backend="cpu")
    total = cfg.num_experts * len(cfg.moe_layers)
    runs = {}
    for cpu in (True, False):
        eng = engine(path, "moespeq", 2 * total, len(prompt) + 12, str(hw), spec_depth="0", cpu_experts=cpu)
        assert eng.plan.slots == total  # every expert resident, the draft beside them
        eng.target_exec.decisions = []
        assert generate(eng, prompt, 12) == expected
        runs[cpu] = eng
    balanced = runs[True].target_exec.decisions
    assert all(set(alt) == {"device", "cpu"} for *_, alt, _c in balanced)  # nothing missed: no copy choices
    for _layer, _e, alt, choice in balanced:
        assert choice == min(alt, key=lambda p: (alt[p], p != "device"))
    assert (runs[True].last_stats.cpu_expert_share > 0) == moved
    assert not runs[False].last_stats.cpu_expert_share
    assert runs[True].last_stats.io_stall_s == 0  # waiting for the CPU's share is compute, not a transfer's stall
    with_cpu, alone = (runs[c].last_stats.tokens_per_s for c in (True, False))
    if moved:
        assert with_cpu > alone
    else:  # the same steps, but with CPU experts the prompt skips gate-prefetch's lookahead
        assert with_cpu >= alone


def test_prefetch_recall_counts_the_misses_served_on_the_cpu(tiny, link):
    """Recall is "used experts that had been prefetched / used and not resident before"
    (docs/design.md §5): a miss computed on the CPU is one no prefetch brought, so it
    counts below the line (it was left out: recall read ~10x too high with CPU experts)."""
    path, _ = tiny("mixtral", "top3")
    prompt = prompt_for(7)
    eng = engine(path, "moespeq", 4, len(prompt) + 24, link(2e8), spec_depth="2")
    generate(eng, prompt, 24)
    st, s = eng.cache.stats, eng.last_stats
    assert st.prefetches and st.host_misses
    assert st.host_misses <= st.host_computed <= st.lookups
    assert s.prefetch_recall == pytest.approx(st.prefetch_used / (st.prefetch_used + st.demand_loads + st.host_misses))
    assert s.prefetch_recall < st.prefetch_used / (st.prefetch_used + st.demand_loads)


def test_prefetch_recall_is_the_share_of_needed_fills_a_prefetch_made():
    from moespeq_cli.runtime.tiers.cache import CacheStats

    st = CacheStats(prefetches=4, prefetch_used=3, demand_loads=1, host_misses=36)
    assert st.prefetch_recall == 3 / 40 and st.prefetch_precision == 3 / 4
    assert CacheStats(prefetch_used=0, demand_loads=2, host_misses=3).prefetch_recall is None  # nothing prefetched


def test_overlap_counts_only_copy_time_under_the_device_s_compute():
    """`copy_overlap` (and `profile`'s overlap) is copy time hidden under the device's own
    compute: copy time while the compute stream stalls is never hidden, whatever the CPU
    does meanwhile (the CPU's lane and the waits for balanced experts counted as compute:
    the demo's default run showed 92% where 60% was hidden). The stall's share spent
    waiting for the CPU is `cpu_wait_s`."""
    from moespeq_cli.model_ref import DEMO_VRAM, resolve

    _, path = resolve(None)
    eng = Engine(path, EngineOptions(vram=DEMO_VRAM, policy="moespeq"))
    ids = eng.tokenizer.encode("First Citizen:\n")
    eng.load(len(ids) + 32)
    generate(eng, ids, 32)
    ivs = eng.backend.timeline.intervals
    s = eng.last_stats
    copies = [iv for iv in ivs if iv.kind == "copy"]
    stalls = [iv for iv in ivs if iv.stream == "compute" and iv.kind == "stall"]
    total = sum(c.duration for c in copies)
    exposed = sum(max(0.0, min(c.end, w.end) - max(c.start, w.start)) for c in copies for w in stalls)
    assert total and exposed > 0
    assert s.copy_overlap * total <= total - exposed + 1e-12
    assert s.copy_overlap == pytest.approx(eng.backend.timeline.overlap_s() / total)
    waits = sum(w.duration for w in stalls if w.name == "wait CPU")
    assert 0 < s.cpu_wait_s == pytest.approx(waits) and s.cpu_wait_s <= s.io_stall_s


@pytest.mark.parametrize("asked, expect", [(None, 1), (2, 2)])
def test_the_mock_computes_on_one_thread_unless_asked(tiny, asked, expect):
    """The simulator's own arithmetic (its clock is virtual) on one thread: torch's threads
    spin at each op's barrier, and beside one busy process the demo ran 4-5x slower."""
    import torch

    from moespeq_cli.runtime.engine import Engine, EngineOptions

    path, _ = tiny("mixtral", "gqa")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        eng = Engine(path, EngineOptions(backend="mock", hardware="rtx3060-12gb", cpu_threads=asked))
        assert torch.get_num_threads() == expect
        eng.close()
        assert torch.get_num_threads() == (2 if asked is None else expect)  # put back: later real runs in the process
    finally:
        torch.set_num_threads(before)
