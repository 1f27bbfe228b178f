"""Offloading: every policy on the mock backend gives the cpu backend's tokens, and the
deterministic clock ranks the policies as their design says."""

import json

import pytest
from offload_helpers import prompt_for, run_engine, vram_for_slots

from moespeq_cli.runtime.engine import Engine, EngineOptions
from moespeq_cli.runtime.scheduling.policies import POLICIES

BASELINES = [p for p in POLICIES if p != "moespeq"]  # moespeq: tests/test_speculative.py

CASES = [
    ("mixtral", "top3"),
    ("qwen2_moe", "shared"),
    ("deepseek_v2", "lite"),
    ("phimoe", "gqa"),
    ("olmoe", "clip"),
    ("qwen3_moe", "dense_layer"),
    ("deepseek_v3", "flat"),
    ("glm4_moe", "base"),
    ("glm4_moe_lite", "flash"),
    ("qwen3_next", "full_first"),
    ("qwen3_5_moe", "full_first"),
    ("gpt_oss", "clamped"),
    ("gemma4", "alternating"),
]


@pytest.mark.parametrize("family,variant", CASES)
def test_every_policy_gives_cpu_tokens(tiny, family, variant):
    path, _ = tiny(family, variant)
    prompt = prompt_for(5, 12)
    expected, _ = run_engine(path, prompt, 24, backend="cpu")
    from moespeq_cli.models.checkpoint import Checkpoint

    cfg = Checkpoint(path).config
    total = cfg.num_experts * len(cfg.moe_layers)
    for policy in BASELINES:
        budgets = [total] if policy == "resident" else [cfg.top_k, cfg.top_k + 1, total // 2, total]
        for slots in budgets:
            got, eng = run_engine(path, prompt, 24, policy=policy, slots=slots)
            assert got == expected, (policy, slots)
            assert eng.plan.slots == (min(slots, cfg.top_k) if policy == "ondemand" else slots)


def test_sampling_with_seed_is_identical_across_policies(tiny):
    from moespeq_cli.runtime.sampling import SamplingParams

    path, _ = tiny("mixtral", "gqa")
    s = SamplingParams(temperature=0.9, top_p=0.95, seed=11)
    expected, _ = run_engine(path, prompt_for(6, 12), 20, backend="cpu", sampling=s)
    for policy in ("ondemand", "lru", "gate-prefetch", "moespeq"):  # moespeq: drafter-invariant (sampling.py)
        got, _ = run_engine(path, prompt_for(6, 12), 20, policy=policy, slots=3, sampling=s)
        assert got == expected


def stats_for(path, policy, slots, prompt):
    _, eng = run_engine(path, prompt, 32, policy=policy, slots=slots)
    return eng.last_stats, eng


def test_policy_figures_on_the_mock_clock(tiny):
    """One tiny model, one budget: the orderings docs/design.md §4 predicts."""
    path, _ = tiny("mixtral", "top3")  # 2 layers x 8 experts, top-3
    prompt = prompt_for(7, 12)
    slots = 6  # of 16: the warm start holds 3 per layer, so experts move
    ondemand, _ = stats_for(path, "ondemand", slots, prompt)
    lru, _ = stats_for(path, "lru", slots, prompt)
    gate, _ = stats_for(path, "gate-prefetch", slots, prompt)
    resident, _ = stats_for(path, "resident", 16, prompt)
    assert lru.bytes_h2d < ondemand.bytes_h2d
    assert gate.io_stall_s < lru.io_stall_s
    assert resident.io_stall_s == 0.0 and resident.bytes_h2d == 0 and resident.expert_hit_rate == 1.0
    assert ondemand.expert_hit_rate == 0.0
    assert resident.seconds < lru.seconds < ondemand.seconds
    assert gate.prefetch_precision is not None and 0 < gate.prefetch_precision <= 1
    for s in (ondemand, lru, gate, resident):
        assert s.clock == "virtual" and s.bound_ratio >= 1.0 - 1e-9


def test_same_run_twice_gives_identical_trace(tiny, cli, tmp_path):
    path, _ = tiny("qwen2_moe", "shared")
    args = [
        "run",
        str(path),
        "-p",
        "hello world, again",
        "-n",
        "12",
        "--backend",
        "mock",
        "--policy",
        "gate-prefetch",
        "--vram",
        str(vram_for_slots(path, 5, 40)),
        "--json",
    ]
    r1 = cli(*args, "--trace", str(tmp_path / "a.json"))
    r2 = cli(*args, "--trace", str(tmp_path / "b.json"))
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.stderr
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert json.loads(r1.stdout)["stats"] == json.loads(r2.stdout)["stats"]


def test_trace_is_chrome_json_and_copies_overlap_compute(tiny, cli, tmp_path):
    path, _ = tiny("mixtral", "top3")
    out = tmp_path / "t.json"
    r = cli(
        "run",
        str(path),
        "-p",
        "overlap please",
        "-n",
        "16",
        "--backend",
        "mock",
        "--policy",
        "gate-prefetch",
        "--vram",
        str(vram_for_slots(path, 12, 40)),
        "--context",  # the context the budget was sized for: 12 slots of 16 experts (the run's own 31 left 15)
        "40",
        "--trace",
        str(out),
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    trace = json.loads(out.read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for e in spans:
        assert {"ph", "ts", "dur", "pid", "tid", "name", "args"} <= set(e) and e["dur"] >= 0
    copies = [e for e in spans if e["cat"] == "copy"]
    computes = [e for e in spans if e["cat"] == "compute"]
    assert copies and computes
    assert all("layer" in e["args"] and "expert" in e["args"] and e["args"]["bytes"] > 0 for e in copies)
    overlapped = sum(
        1 for c in copies for k in computes if k["ts"] < c["ts"] + c["dur"] and c["ts"] < k["ts"] + k["dur"]
    )
    assert overlapped > 0
    assert len({e["tid"] for e in spans}) >= 2  # a track per stream


def test_json_carries_plan_and_offload_figures(tiny, cli):
    path, _ = tiny("olmoe", "base")
    r = cli(
        "run",
        str(path),
        "-p",
        "figures",
        "-n",
        "8",
        "--backend",
        "mock",
        "--hardware",
        "rtx4090-24gb",
        "--vram",
        str(vram_for_slots(path, 4, 7 + 8)),
        "--policy",
        "lru",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["hardware"] == "rtx4090-24gb" and out["policy"] == "lru" and out["backend"] == "mock"
    plan = out["plan"]
    assert plan["slots"] == 4 and plan["total_experts"] == 16
    assert plan["fixed_bytes"] == plan["non_expert_bytes"] + plan["kv_cache_bytes"] + plan["workspace_bytes"]
    s = out["stats"]
    assert s["clock"] == "virtual" and s["bytes_h2d"] > 0 and 0 <= s["expert_hit_rate"] <= 1
    assert s["acceptance_rate"] is None


def test_plan_is_printed(tiny, cli):
    path, _ = tiny("olmoe", "base")
    vram = str(vram_for_slots(path, 4, 7 + 4))
    r = cli("run", str(path), "-p", "figures", "-n", "4", "--backend", "mock", "--vram", vram, "--spec-depth", "2")
    assert r.exit_code == 0, r.stderr
    assert "plan:" in r.stderr and "expert slots (3 of 16)" in r.stderr and "non-expert weights" in r.stderr
    assert "4-bit draft experts (7 of 16)" in r.stderr  # half the room above top_k slots
    # with the depth left to moespeq, this budget's draft cannot pay: the plan has the slots instead
    r = cli("run", str(path), "-p", "figures", "-n", "4", "--backend", "mock", "--vram", vram)
    assert r.exit_code == 0 and "4-bit draft" not in r.stderr.split("\n")[0] and "speculation off:" in r.stderr


@pytest.mark.parametrize("policy", ["lru", "gate-prefetch", "hybrid", "ondemand"])
def test_caching_policies_start_with_their_slots_filled(tiny, policy):
    """Slots are filled at load time, the same number per layer (lowest ids), and the
    copies are not counted as the run's; ondemand keeps nothing, so it starts empty."""
    path, _ = tiny("mixtral", "top3")  # 2 layers x 8 experts
    vram = vram_for_slots(path, 6, 64)
    eng = Engine(path, EngineOptions(backend="mock", policy=policy, vram=vram))
    eng.load(64)
    if policy == "ondemand":
        assert not eng.cache.slot_of
        return
    layers = sorted(eng.model.moe_blocks)
    assert sorted(eng.cache.slot_of) == [(layer, e) for layer in layers for e in range(3)]
    assert eng.cache.stats.demand_loads == eng.cache.stats.prefetches == 0
    assert eng.backend.now() == 0.0
