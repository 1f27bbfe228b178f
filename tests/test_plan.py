"""``moespeq plan``: placement and modelled tokens/s from config.json alone, offline for
every alias (bundled configs), and a model that agrees with the mock clock where both
describe the same thing."""

import json
from dataclasses import replace

import pytest
import torch
from offload_helpers import prompt_for, run_engine, vram_for_slots

from moespeq_cli.model_ref import ALIASES, CONFIGS_DIR
from moespeq_cli.models import architecture, language_config
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.runtime.planning.estimate import StepModel, estimate
from moespeq_cli.runtime.planning.hardware import load_profile, parse_size
from moespeq_cli.runtime.planning.planner import make_plan


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


def plan_json(cli, *args):
    r = cli("plan", *args, "--json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_mixtral_on_a_12gb_desktop(cli):
    out = plan_json(cli, "mixtral", "--vram", "12GB", "--ram", "128GB", "--hardware", "desktop-3060-ddr4")
    assert out["config"].startswith("bundled config of mistralai/Mixtral-8x7B")
    assert out["total_experts"] == 32 * 8 and out["expert_bytes"] == 3 * 4096 * 14336 * 2
    rows = {r["policy"]: r for r in out["policies"]}
    assert not rows["resident"]["fits"] and "--vram" in rows["resident"]["reason"]
    for name in ("moespeq", "hybrid", "gate-prefetch", "lru"):
        r = rows[name]
        assert r["fits"] and r["device_bytes"] <= parse_size("12GB")
        assert r["plan"]["slots"] >= 2 and r["estimate"]["tokens_per_s"] > 0
    # host memory (~40 GB/s) beats the link (~25 GB/s): computing misses on the CPU wins
    assert rows["hybrid"]["estimate"]["tokens_per_s"] > rows["lru"]["estimate"]["tokens_per_s"]
    # moespeq with CPU experts can use the link and the CPU at once
    assert rows["moespeq"]["estimate"]["tokens_per_s"] >= rows["hybrid"]["estimate"]["tokens_per_s"]


def test_three_tiers_when_ram_is_short(cli):
    """--ram below the experts' bytes: RAM holds what fits beside the draft's host experts,
    the rest is read from disk, every policy is slower than with all of RAM, and the plan
    says which part of the model lives where."""
    args = ("mixtral", "--vram", "12GB", "--hardware", "desktop-3060-ddr4")
    full = {r["policy"]: r for r in plan_json(cli, *args, "--ram", "128GB")["policies"]}
    out = plan_json(cli, *args, "--ram", "48GB")
    assert out["ram_bytes"] == parse_size("48GB") and out["ram_source"] is None
    expert = out["expert_bytes"]
    for r in out["policies"]:
        if not r["fits"]:
            continue
        p = r["plan"]
        assert p["disk_tier"] and p["host_bytes"] <= parse_size("48GB")
        assert p["host_slots"] == (parse_size("48GB") - p["host_draft_bytes"]) // expert
        assert r["disk_bytes"] == (p["total_experts"] - p["host_slots"]) * expert
        assert r["estimate"]["tokens_per_s"] < full[r["policy"]]["estimate"]["tokens_per_s"]
        assert not full[r["policy"]]["plan"]["disk_tier"]
    r = cli("plan", *args, "--ram", "48GB")
    assert r.exit_code == 0 and "disk only" in r.stdout
    bad = cli("plan", *args, "--ram", "100MB")
    assert bad.exit_code == 0 and "cannot hold 2 expert slots" in bad.stdout  # every row refused, with the reason
    assert bad.stdout.count("cannot hold 2 expert slots") == 1  # one reason said once, for all it refuses


BUDGETS = {
    "deepseek-v3": ("80GB", "256GB"),
    "kimi-k2": ("80GB", "256GB"),
    "glm-4.7": ("80GB", "256GB"),
    "glm-4.5-air": ("24GB", "64GB"),
}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_every_alias_plans_offline(cli, alias):
    vram, ram = BUDGETS.get(alias, ("12GB", "64GB"))
    out = plan_json(cli, alias, "--vram", vram, "--ram", ram, "--hardware", "desktop-3060-ddr4", "--context", "2048")
    fitting = [r for r in out["policies"] if r["fits"]]
    assert any(r["policy"] == "moespeq" for r in fitting)
    for r in fitting:
        assert r["device_bytes"] <= parse_size(vram)


def test_bundled_configs_are_the_real_models():
    """Total parameter counts of the published models, from the bundled configs alone."""
    expected = {
        "mixtral": 46.7,
        "phi-moe": 41.9,
        "qwen-moe": 14.3,
        "qwen3-moe": 30.5,
        "olmoe": 6.9,
        "deepseek-lite": 15.7,
        "gpt-oss-20b": 20.9,
        "gpt-oss-120b": 116.8,
        "deepseek-v3": 671.0,
        "kimi-k2": 1026.4,  # "1T" in its model card
        "qwen3-next": 79.7,  # "80B" in its model card
        "glm-4.7": 352.8,  # "355B" in its model card, which counts its MTP layer (about 4B) too
        "glm-4.5-air": 106.9,  # "106B"
        "glm-4.7-flash": 29.9,  # "30B-A3B"
        "qwen3.5-moe": 34.7,  # "35B" (its model card and transformers' Qwen3_5MoeTextConfig defaults)
        "qwen3.6-moe": 34.7,  # the same shapes (its model card)
        "gemma-4-26b": 26.0,  # llama.cpp's count of its GGUF; the card's 25.2B leaves out the 0.74B embedding
    }
    assert set(expected) == set(ALIASES)
    for alias, billions in expected.items():
        raw, _ = language_config(json.loads((CONFIGS_DIR / f"{alias}.json").read_text()))
        arch = architecture(raw["model_type"])
        cfg = arch.parse(raw)
        with torch.device("meta"):
            model = arch.Model(raw)
        total = sum(p.numel() for p in model.parameters()) + cfg.expert_params * cfg.num_experts * len(cfg.moe_layers)
        assert total / 1e9 == pytest.approx(billions, abs=0.1), alias
        if alias in ACTIVATED:  # what a token computes, less the input embedding (a lookup)
            active = total - cfg.expert_params * (cfg.num_experts - cfg.top_k) * len(cfg.moe_layers)
            active -= model.model.embed_tokens.weight.numel()
            assert abs(active / 1e9 - ACTIVATED[alias]) < 1, alias  # cards round, and count the LM head or not


ACTIVATED = {  # billions, from their model cards
    "deepseek-v3": 37,
    "kimi-k2": 32,
    "glm-4.7": 32,
    "glm-4.5-air": 12,
    "glm-4.7-flash": 3,
    "qwen3.5-moe": 3,
    "qwen3.6-moe": 3,
    "gemma-4-26b": 3.8,
}


# host seconds a call beyond its priced work, as calibrate measures them: large enough here
# to be most of a step, so that a model leaving them out is far from the mock's clock
HOST_TIME = {"attention": 2e-4, "router": 5e-5, "expert": 1e-4, "layer": 3e-4, "lm_head": 1e-5}


@pytest.mark.parametrize(
    "host_time,dtype",
    [({}, torch.float32), (HOST_TIME, torch.float32), ({}, torch.bfloat16)],
    ids=["bundled", "calibrated-host-time", "bf16"],
)
def test_model_agrees_with_the_mock_clock_for_resident(tiny, host_time, dtype):
    """Everything on the device: the estimate prices the same kernels the mock clock
    charges, the same ops (q, k and v fused, the executor's own ops between experts
    counted; a bf16 checkpoint's widening on the mock, which computes in float32, is no
    GPU launch) and the same host time a calibrated profile measured beyond them: the
    same step, to rounding (0.91-0.98 of it before those three were counted alike)."""
    path, _ = tiny("mixtral", "top3", dtype)
    prompt = prompt_for(2)
    n = 24
    ck = Checkpoint(path)
    total = ck.config.num_experts * len(ck.config.moe_layers)
    hw = replace(load_profile("rtx3060-12gb"), region_overhead=host_time)
    _, eng = run_engine(path, prompt, n, policy="resident", slots=total, hardware=hw)
    measured = eng.last_stats.tpot_s
    with torch.device("meta"):
        model = ck.arch.Model(ck.raw_config)
    step = StepModel(model, ck.config, hw, ck.config.dtype, len(prompt) + n // 2)
    plan = make_plan(model, ck.config, ck.config.dtype, vram_for_slots(path, total, 40), 40, "resident")
    modelled = 1.0 / estimate(step, plan).tokens_per_s
    assert modelled == pytest.approx(measured, rel=1e-3)


def test_the_draft_pass_has_no_grouped_call(tiny):
    """On a GPU that computes a layer's experts in one grouped call, the target's pass
    pays that call's launches and measured host time once a layer; the draft's pass runs
    its experts one by one (its executor's ops, counted with a stand-in; each expert
    priced with its own launches and host time), so it pays neither."""
    from moespeq_cli.models import build_model

    path, _ = tiny("mixtral", "gqa")
    ck = Checkpoint(path)
    hw = replace(load_profile("h100-pcie"), region_overhead={"experts": 1e-3, "experts sum": 5e-4, "attention": 2e-4})
    step = StepModel(build_model(ck.arch, ck.raw_config, 16), ck.config, hw, torch.bfloat16, 16)
    assert step.grouped_ops is not None
    layers = len(ck.config.moe_layers)
    ungrouped = StepModel(
        build_model(ck.arch, ck.raw_config, 16), ck.config, replace(hw, grouped_gemm=()), torch.bfloat16, 16
    )
    assert ungrouped.grouped_ops is None
    # the draft's pass is the pass of the same GPU without a grouped GEMM kernel
    assert step.draft_pass() == pytest.approx(ungrouped.non_expert(1))
    assert step.non_expert(1) - step.draft_pass() == pytest.approx(
        layers * 1.5e-3 + (step.pass_ops(1) - ungrouped.pass_ops(1)) * hw.launch_overhead
    )


def test_plan_reads_a_local_checkpoint(tiny, cli):
    path, _ = tiny("olmoe", "base")
    out = plan_json(cli, str(path), "--vram", "1MiB", "--context", "64")
    assert out["config"] == str(path / "config.json")
    assert {r["policy"] for r in out["policies"]} >= {"moespeq", "moespeq (no cpu)", "hybrid", "lru"}


def test_plan_text_output(cli):
    r = cli("plan", "olmoe", "--vram", "8GB", "--hardware", "desktop-3060-ddr4")
    assert r.exit_code == 0, r.stderr
    assert "tok/s" in r.stdout and "hybrid" in r.stdout and "allenai/OLMoE" in r.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["someorg/some-model"], "--config-only"),
        (["nonsense-model"], "unknown model"),
        (["mixtral", "--vram", "lots"], "cannot read --vram"),
        (["mixtral", "--hardware", "gpu9000"], "unknown hardware profile"),
        # a --context the prompt and -n do not fit: refused as run refuses it (the demo: run's prompt)
        (["--context", "1"], "plus --max-new-tokens 128 needs"),
        (["-n", "4", "-p", "hello", "--context", "2"], "more than --context 2"),
        (["mixtral", "--context", "64", "-n", "64"], "no room for a prompt"),  # a bundled config: no tokenizer
    ],
)
def test_plan_bad_input(cli, args, needle):
    r = cli("plan", *args)
    assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_a_budget_beyond_the_profiles_device_is_noted(cli):
    """--vram past the profile's memory (the default RTX 3060 when --hardware is not given)
    is planned as asked, with a note that the device is priced as that profile's."""
    assert plan_json(cli, "olmoe", "--vram", "8GB")["budget_note"] is None
    note = plan_json(cli, "olmoe", "--vram", "16GB")["budget_note"]
    assert "more than rtx3060-12gb's 12.00 GiB" in note and "--hardware" in note
    r = cli("plan", "olmoe", "--vram", "16GB")
    assert r.exit_code == 0 and "note: --vram 14.90 GiB is more than rtx3060-12gb's" in r.stderr


def test_list_hardware(cli):
    from moespeq_cli.runtime.planning.hardware import available_profiles

    r = cli("plan", "--list-hardware")
    assert r.exit_code == 0 and "rtx3060-12gb" in r.stdout and "(default)" in r.stdout
    rows = json.loads(cli("plan", "--list-hardware", "--json").stdout)["profiles"]
    assert [row["name"] for row in rows] == available_profiles()


def test_a_disk_reads_share_follows_what_ram_holds_beside_the_device():
    """With a disk tier, the share of the device's misses that wait for a read: with CPU
    experts the device's set is placed once, so RAM (an LRU) keeps only the other experts
    (measured on the mock: hybrid's RAM held none of the device's ten at the end of a run,
    lru's nine); otherwise RAM holds what it read for a copy, the device's experts too."""
    from moespeq_cli.model_ref import DEMO_DIR
    from moespeq_cli.models import build_model
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.runtime.planning.estimate import StepModel
    from moespeq_cli.runtime.planning.hardware import load_profile
    from moespeq_cli.runtime.planning.planner import checkpoint_plan

    ck, hw, ctx = Checkpoint(DEMO_DIR), load_profile("laptop-8gb"), 84
    step = StepModel(build_model(ck.arch, ck.raw_config, ctx), ck.config, hw, ck.config.dtype, ctx)
    read = hw.disk_latency + step.expert_bytes / hw.disk_bandwidth
    for policy, static in (("hybrid", True), ("lru", False)):
        plan = checkpoint_plan(ck, ctx, 16_000_000, policy, with_draft=False, cpu_experts=static, ram=8_000_000)
        n, s, h = plan.total_experts, plan.slots, plan.host_slots
        assert plan.disk_tier and 0 < s <= h < n
        share = (1 - h / (n - s)) if static else (1 - (h - s) / (n - s))
        assert step.for_plan(plan).read_extra == pytest.approx(share * read), policy


def test_a_bundled_config_plans_the_context_given_beside_max_new_tokens(cli):
    """A bundled config has no tokenizer to count a prompt with: with --context given, -n
    is checked against it and the context planned (refused outright in a first version)."""
    out = plan_json(cli, "mixtral", "--context", "4096", "-n", "64")
    assert out["context_tokens"] == 4096


def test_an_alias_s_repository_by_its_id_plans_from_the_bundled_config(cli, monkeypatch, tmp_path):
    """`plan mistralai/Mixtral-8x7B-Instruct-v0.1`, not downloaded, is `plan mixtral`
    (it asked for a config-only pull of what moespeq ships)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    by_id = plan_json(cli, "mistralai/Mixtral-8x7B-Instruct-v0.1", "--ram", "48GB")
    by_alias = plan_json(cli, "mixtral", "--ram", "48GB")
    assert by_id["config"] == by_alias["config"] == "bundled config of mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert by_id["policies"] == by_alias["policies"]


def test_plan_says_the_ram_that_holds_every_expert(cli):
    """A RAM slot is an expert in whole pages: `--ram` of the experts' size (what plan
    said) still left a disk tier, 0.25 MiB short on the demo (QA). plan gives the figure
    that holds them all, and run with it reads nothing from disk."""
    out = plan_json(cli, "demo")
    need, size = out["experts_ram_bytes"], out["experts_bytes"]
    assert need > size
    for ram, disk in ((need, False), (size, True)):
        r = cli("run", "demo", "-n", "2", "-p", "hi", "--backend", "cpu", "--ram", f"{ram}B", "--json")
        assert r.exit_code == 0, r.stderr
        plan = json.loads(r.stdout)["plan"]
        assert (plan is not None and plan["disk_tier"]) == disk, plan


def test_two_sizes_that_differ_are_never_said_alike():
    """'--vram 375.72 KiB cannot hold ... it needs at least 375.72 KiB': where two decimals
    of the unit hide the difference, both are said in bytes."""
    from moespeq_cli.runtime.planning.hardware import sizes_apart

    assert sizes_apart(384735, 384736) == ("384,735 bytes", "384,736 bytes")
    assert sizes_apart(2**20, 2**21) == ("1.00 MiB", "2.00 MiB")


def test_compact_experts_priced_at_their_roofline_are_said_to_be(cli):
    """gpt-oss's MXFP4 experts planned on a GPU without a grouped GEMM are charged their
    stored bytes, not their unpacking: an H100 (priced for what its code moves) read 4x
    slower than an A100 without a word. Said now; not on the H100, nor for bf16 experts."""
    note = plan_json(cli, "gpt-oss-20b", "--vram", "20GB", "--hardware", "a100-40gb-pcie")["pricing_note"]
    assert "stored mxfp4" in note and "no grouped GEMM" in note and "optimistic" in note
    assert plan_json(cli, "gpt-oss-20b", "--vram", "20GB", "--hardware", "h100-pcie")["pricing_note"] is None
    assert plan_json(cli, "mixtral", "--hardware", "a100-40gb-pcie")["pricing_note"] is None
    r = cli("plan", "gpt-oss-20b", "--vram", "20GB", "--hardware", "rtx4090-24gb")
    assert r.exit_code == 0 and "note: this model's experts are stored mxfp4: on rtx4090-24gb" in r.stderr


def test_a_ram_beyond_the_machines_memory_is_noted(cli, tiny, monkeypatch):
    """A given --ram that lets expert buffers take more RAM than the machine has available
    is planned and run as asked, with a note that it would swap; a --ram that fits, or the
    default (sized to what is available), gets none."""
    from moespeq_cli.runtime.planning import planner

    monkeypatch.setattr(planner, "memory_info", lambda: (16 * 2**30, 8 * 2**30))
    assert plan_json(cli, "mixtral", "--ram", "4GB")["ram_note"] is None
    assert plan_json(cli, "mixtral")["ram_note"] is None
    out = plan_json(cli, "mixtral", "--ram", "1TB")
    held = max(r["plan"]["ram_held_bytes"] for r in out["policies"] if r["fits"])
    assert held > 8 * 2**30 and "available: it would swap" in out["ram_note"]
    assert "8.00 GiB available" in out["ram_note"]
    r = cli("plan", "mixtral", "--ram", "1TB")
    assert r.exit_code == 0 and "note: --ram 931.32 GiB lets experts take" in r.stderr
    # planning another machine (the README's `--hardware desktop-3060-ddr4 --ram 48GB`): its memory is not this one's
    out = plan_json(cli, "mixtral", "--ram", "1TB", "--hardware", "desktop-3060-ddr4")
    assert out["ram_note"] is None and max(r["plan"]["ram_held_bytes"] for r in out["policies"] if r["fits"]) > held / 2
    # the default profile spelled out is the same plan, with the same note (issue 19: one default)
    spelled = plan_json(cli, "mixtral", "--ram", "1TB", "--hardware", "rtx3060-12gb")["ram_note"]
    assert spelled is not None and spelled == plan_json(cli, "mixtral", "--ram", "1TB")["ram_note"]
    # a run: the tiny model's experts against a machine of 128 KiB available
    path, _ = tiny("mixtral", "gqa")
    monkeypatch.setattr(planner, "memory_info", lambda: (2**30, 128 * 1024))
    args = ("run", str(path), "-p", "hi", "-n", "2", "--backend", "mock", "--vram", "1GB")
    r = cli(*args, "--ram", "1GB")
    assert r.exit_code == 0, r.stderr
    assert "lets experts take" in r.stderr and "128.00 KiB available" in r.stderr
    r = cli(*args, "--ram", "100KB")
    assert r.exit_code == 0, r.stderr
    assert "lets experts take" not in r.stderr
    # --backend cpu with every expert fitting --ram: all of them in RAM (no plan), noted too, and in --json
    r = cli("run", str(path), "-p", "hi", "-n", "2", "--backend", "cpu", "--ram", "1GB")
    assert r.exit_code == 0 and "lets experts take" in r.stderr, r.stderr
    r = cli("run", str(path), "-p", "hi", "-n", "2", "--backend", "cpu", "--ram", "1GB", "--json")
    assert "128.00 KiB available" in json.loads(r.stdout)["ram_note"]


def test_rollback_states_are_planned_only_where_a_draft_may_roll_back(cli):
    """Qwen3-Next's linear-attention layers keep a state per position of a speculative
    cycle (10 at the default depth); lru, ondemand and the other draftless policies keep
    the newest only, so their KV cache was planned 9 states too large."""
    from moespeq_cli.model_ref import resolve_config
    from moespeq_cli.models import build_model, parse_config
    from moespeq_cli.runtime.planning.planner import recurrent_state_bytes, rollback_states

    out = plan_json(cli, "qwen3-next", "--vram", "24GB")
    kv = {r["policy"]: r["plan"]["kv_cache_bytes"] for r in out["policies"] if r["fits"]}
    _, raw, source = resolve_config("qwen3-next")
    state = recurrent_state_bytes(build_model(parse_config(raw, source)[0], raw, 64, source), 1)
    assert state > 0 and kv["moespeq"] - kv["lru"] == 9 * state
    assert kv["lru"] == kv["ondemand"] == kv["gate-prefetch"]
    # moespeq without a draft still marks each cycle's start (KVCache.keep_from): two states
    assert (rollback_states("moespeq", True), rollback_states("moespeq", False)) == (10, 2)
    assert rollback_states("lru", True) == rollback_states("lru", False) == 1
    mixtral = {r["policy"]: r["plan"]["kv_cache_bytes"] for r in plan_json(cli, "mixtral")["policies"] if r["fits"]}
    assert len(set(mixtral.values())) == 1  # (no linear attention: the same for every policy)
    r = cli("plan", "qwen3-next", "--vram", "24GB")
    assert "without a draft's rollback states" in r.stdout


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", None])
def test_the_plan_counts_experts_as_the_tiers_hold_them(tiny, dtype):
    """Every tier holds an expert as the checkpoint stores it (the disk tier reads it in
    place); ``--dtype`` sets what the model computes in. A float32 checkpoint run with
    --dtype bfloat16 was planned at half its experts' bytes: its device slots and RAM
    then took twice what the plan reserved."""
    from moespeq_cli.runtime.engine import Engine, EngineOptions

    path, _ = tiny("mixtral", "gqa")  # float32
    eng = Engine(path, EngineOptions(backend="mock", policy="lru", dtype=dtype))
    eng.load(16)
    try:
        assert eng.plan.expert_bytes == eng.target_exec.cache.nbytes
        assert eng.plan.expert_bytes == Checkpoint(path).config.stored_expert_bytes
        assert eng.plan.slot_bytes == eng.plan.slots * eng.target_exec.cache.slot_bytes
    finally:
        eng.close()


@pytest.mark.parametrize("depth", [2, 12])
def test_a_fixed_spec_depth_plans_the_rollback_states_a_cycle_keeps(tiny, monkeypatch, depth):
    """A cycle of ``--spec-depth N`` keeps N + 2 states per linear-attention layer (its
    start, the drafts, the bonus token): the plan counts them, not the default depth's 10
    (14 held at depth 12 where 10 were planned)."""
    from moespeq_cli.models.base import KVCache
    from moespeq_cli.runtime.engine import Engine, EngineOptions
    from moespeq_cli.runtime.planning.planner import recurrent_state_bytes
    from moespeq_cli.runtime.sampling import SamplingParams

    path, _ = tiny("qwen3_next", "hybrid")
    held = []
    save = KVCache.save_states

    def counted(self, layer, per_token):
        save(self, layer, per_token)
        held.append(len(self.states[layer]))

    monkeypatch.setattr(KVCache, "save_states", counted)
    prompt, n = prompt_for(3, 10), 3 * depth + 4
    opts = EngineOptions(backend="mock", policy="moespeq", spec_depth=str(depth), draft_verdict=False)
    eng = Engine(path, opts)
    plan = eng.make_plan(len(prompt) + n)
    newest_only = Engine(path, replace(opts, policy="lru", spec_depth="auto")).make_plan(len(prompt) + n)
    eng.load(len(prompt) + n, plan)
    try:
        assert len(list(eng.generate(prompt, n, SamplingParams()))) == n
        state = recurrent_state_bytes(eng.model, 1)
    finally:
        eng.close()
    assert state > 0 and max(held) == depth + 2
    assert plan.kv_cache_bytes - newest_only.kv_cache_bytes == (depth + 1) * state


def test_the_workspace_holds_a_pass_s_activations_not_the_head_s_logits_for_every_token(cli):
    """A prefill computes the language-model head for its last token only (and a
    verification for its few rows): the workspace grows with the context by the
    activations of a token, not by a row of logits over the whole vocabulary (Qwen3's
    151,936: 2.3 GiB at 4096 tokens, the better part of the workspace)."""
    short, long = (
        plan_json(cli, "qwen3-moe", "--vram", "24GB", "--ram", "20GB", "--context", c) for c in ("4096", "8192")
    )
    per_token = (
        long["policies"][0]["plan"]["workspace_bytes"] - short["policies"][0]["plan"]["workspace_bytes"]
    ) / 4096
    hidden, vocab = 2048, 151936
    assert per_token < vocab * 2
    assert per_token >= 8 * hidden * 2  # the pass's activations still are
