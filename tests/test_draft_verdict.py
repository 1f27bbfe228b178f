"""The plan's verdict on the draft: where even every drafted token accepted could not pay
for the draft's memory (by the cost model, planning/estimate.py), moespeq does not load
it, and says why; ``plan`` predicts the same; the governor's run-time release stays for
the cases the model cannot decide."""

from __future__ import annotations

import json
import re
from dataclasses import replace

from moespeq_cli.model_ref import DEMO_DIR
from moespeq_cli.models import build_model
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.runtime.bench import budget_for, run_policy
from moespeq_cli.runtime.engine import Engine, EngineOptions
from moespeq_cli.runtime.planning.estimate import StepModel, plan_moespeq, speculation_cannot_pay
from moespeq_cli.runtime.planning.hardware import load_profile
from moespeq_cli.runtime.planning.planner import checkpoint_plan

CONTEXT = 149  # the demo's prompt and 128 new tokens


def verdict(hw, vram, cpu_experts=False):
    ck = Checkpoint(DEMO_DIR)
    kw = dict(cpu_experts=cpu_experts)
    with_draft = checkpoint_plan(ck, CONTEXT, vram, "moespeq", with_draft=True, **kw)
    released = checkpoint_plan(ck, CONTEXT, vram, "moespeq", with_draft=False, **kw)
    step = StepModel(build_model(ck.arch, ck.raw_config, CONTEXT), ck.config, hw, ck.config.dtype, CONTEXT)
    return with_draft, released, speculation_cannot_pay(step, with_draft, released)


def test_a_draft_that_cannot_pay_is_not_loaded_and_run_says_why(cli):
    vram, _ = budget_for(DEMO_DIR, CONTEXT, 0.5)
    with_draft, released, off = verdict(load_profile("rtx3060-12gb"), vram)
    assert off is released and not off.has_draft and off.slots > with_draft.slots
    assert off.note.startswith("speculation off: 9 more full-precision experts in the draft's memory beat")
    # a ratio of at least 1, not rates: a clear verdict's rates are the op estimates', not the plan's row
    ratio = float(re.search(r"at least ([\d.]+)x as fast", off.note).group(1))
    assert ratio > 1.0 and "tok/s" not in off.note
    eng = Engine(DEMO_DIR, EngineOptions(backend="mock", policy="moespeq", vram=vram))
    eng.load(CONTEXT)
    assert not eng.plan.has_draft and eng.plan.slots == off.slots and eng.draft_exec is None
    slots = eng.cache.slots
    eng.release_draft()  # nothing to release (the GPU benchmark forced one and crashed here)
    assert eng.cache.slots == slots
    for n in ("8", "1"):  # one token is the prefill's: no decoding step, the plan's reason still said
        out = json.loads(cli("run", "-n", n, "--vram", f"{vram}B", "--json").stdout)
        assert out["governor_note"].startswith("speculation off:") and out["draft"] is None
    out = json.loads(cli("run", "-n", "8", "--draft", "none", "--json").stdout)  # not "it does not pay"
    assert out["governor_note"].startswith("no draft loaded: speculation is off")
    out = json.loads(cli("run", "-n", "8", "--policy", "lru", "--json").stdout)  # the same keys, null
    assert out["draft"] is None and out["spec_depths"] is None and out["governor_note"] is None
    # a fixed depth, a draft given by path or the run-time verdict keep it
    for opts in (dict(spec_depth="2"), dict(draft_verdict=False)):
        eng = Engine(DEMO_DIR, EngineOptions(backend="mock", policy="moespeq", vram=vram, **opts))
        eng.load(CONTEXT)
        assert eng.plan.has_draft and eng.draft_exec is not None


def test_plan_predicts_what_run_loads():
    vram, _ = budget_for(DEMO_DIR, CONTEXT, 0.5)
    hw = load_profile("rtx3060-12gb")
    ck = Checkpoint(DEMO_DIR)
    step = StepModel(build_model(ck.arch, ck.raw_config, CONTEXT), ck.config, hw, ck.config.dtype, CONTEXT)
    for cpu in (False, True):
        planned, _ = plan_moespeq(step, vram, cpu, ram=20 * 2**30)
        eng = Engine(
            DEMO_DIR, EngineOptions(backend="mock", policy="moespeq", vram=vram, cpu_experts=cpu, ram=20 * 2**30)
        )
        ran = eng.make_plan(CONTEXT)
        assert (planned.has_draft, planned.slots, planned.note) == (ran.has_draft, ran.slots, ran.note)


def test_a_draft_that_could_pay_is_kept():
    """Over a slow link the same budget leaves speculation a chance: the draft is loaded
    and the governor decides; with every expert's slot capped (bench's same cache) the
    draft's memory could buy nothing, so there is nothing to decide."""
    vram, _ = budget_for(DEMO_DIR, CONTEXT, 0.5)
    slow = replace(load_profile("rtx3060-12gb"), link_bandwidth=1e8)
    assert verdict(slow, vram)[2] is None
    ck = Checkpoint(DEMO_DIR)
    capped = checkpoint_plan(ck, CONTEXT, vram, "moespeq", with_draft=True, max_slots=7)
    released = checkpoint_plan(ck, CONTEXT, vram, "moespeq", with_draft=False, max_slots=7)
    step = StepModel(
        build_model(ck.arch, ck.raw_config, CONTEXT), ck.config, load_profile("rtx3060-12gb"), ck.config.dtype, CONTEXT
    )
    assert speculation_cannot_pay(step, capped, released) is None


def test_at_the_demos_same_memory_budget_moespeq_keeps_the_guarantee():
    """The mock clock (deterministic): at the benchmark's same-memory budget on the demo,
    moespeq with its default verdict is within 2% of the best baseline, which releasing the
    draft at run time (after the prefill and the cycles that measure it) was not (0.92x)."""
    from moespeq_cli.cli.run import DEMO_PROMPT

    eng = Engine(DEMO_DIR, EngineOptions(backend="mock"))
    ids = eng.tokenizer.encode(DEMO_PROMPT)
    vram, _ = budget_for(DEMO_DIR, len(ids) + 128, 0.5)
    opts = EngineOptions(backend="mock", vram=vram, cpu_experts=False)
    tps = {p: run_policy(DEMO_DIR, ids, 128, p, opts).stats.tokens_per_s for p in ("moespeq", "gate-prefetch", "lru")}
    assert tps["moespeq"] >= 0.98 * max(tps["gate-prefetch"], tps["lru"]), tps


MIXTRAL_SHAPED = {  # the policy benchmark's checkpoint (scripts/make_checkpoint.py)
    "model_type": "mixtral",
    "hidden_size": 512,
    "intermediate_size": 1792,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1e6,
    "dtype": "bfloat16",
}


def test_the_quick_verdict_stands_only_if_more_launches_would_not_turn_it():
    """The modules' op estimates fall short of the ops a pass really dispatches (91 against
    136-148 on this shape): on a laptop GPU's figures at the benchmark's same-memory budget
    they alone say the draft could pay (597 against 533 tok/s), the count says it cannot
    (525 against 533). The quick answer must hold with its launches scaled up too; here it
    does not (493 against 533, within the 10% that makes an answer clear), so the verdict
    counts."""
    import copy

    from moespeq_cli.models import parse_config
    from moespeq_cli.runtime.planning.estimate import estimate
    from moespeq_cli.runtime.planning.planner import make_plan

    arch, cfg = parse_config(MIXTRAL_SHAPED)
    context = 159
    model = build_model(arch, MIXTRAL_SHAPED, context)
    full = make_plan(model, cfg, cfg.dtype, 10**15, context, "lru")
    vram = full.fixed_bytes + int(full.total_experts * 0.5 * full.expert_bytes)
    with_draft = make_plan(model, cfg, cfg.dtype, vram, context, "moespeq", cpu_experts=False)
    released = make_plan(model, cfg, cfg.dtype, vram, context, "moespeq", cpu_experts=False, with_draft=False)
    hw = load_profile("laptop-8gb")
    step = StepModel(model, cfg, hw, cfg.dtype, context)
    quick = copy.copy(step)
    quick.counted, quick._ops = False, {}
    hit = with_draft.slots / with_draft.total_experts
    bound, _ = quick.for_plan(with_draft).best_depth(with_draft, hit, 1.0, 8, False)
    assert bound > 1.1 * estimate(quick, released).tokens_per_s  # the estimates alone: keep the draft
    off = speculation_cannot_pay(step, with_draft, released)
    assert off is released and not off.has_draft  # counted: it cannot pay


def test_a_fixed_depth_without_room_for_the_draft_says_so(cli):
    """``--spec-depth 4`` where the draft does not fit beside the slots the budget must
    hold: the run decodes at k = 0 and the output says why (it said nothing before)."""
    r = cli("run", "-n", "4", "--backend", "cpu", "--ram", "6MB", "--spec-depth", "4")
    assert "does not fit in --ram" in r.stderr and "speculation is off" in r.stderr, r.stderr
    assert r.stderr.count("does not fit in --ram") == 1 and "--spec-depth 4 is not honoured" in r.stderr
    r = cli("profile", "-n", "4", "--backend", "cpu", "--ram", "6MB", "--spec-depth", "4", "--no-live")
    assert r.exit_code == 0 and r.stderr.count("does not fit in --ram") == 1, r.stderr
    # chat and serve have no end-of-run line: said when the model loads
    from typer.testing import CliRunner

    from moespeq_cli.cli.app import app

    r = CliRunner().invoke(
        app, ["chat", "-n", "4", "--backend", "cpu", "--ram", "6MB", "--spec-depth", "4"], input="hi\n"
    )
    assert r.exit_code == 0 and "--spec-depth 4 is not honoured: the 4-bit draft" in r.stderr, r.stderr
    out = json.loads(cli("run", "-n", "4", "--backend", "cpu", "--ram", "6MB", "--spec-depth", "4", "--json").stdout)
    assert set(out["spec_depths"]) == {0} and "does not fit in --ram" in out["governor_note"]
    out = json.loads(cli("run", "-n", "4", "--backend", "cpu", "--ram", "6MB", "--spec-depth", "0", "--json").stdout)
    assert out["governor_note"] is None  # k = 0 asked for: nothing to explain


def test_a_release_on_the_cpu_says_the_slots_are_in_ram():
    """The cpu backend has no device: after a release its line counts the slots in RAM."""
    from moespeq_cli.cli.run import result_dict
    from moespeq_cli.runtime.sampling import SamplingParams

    eng = Engine(DEMO_DIR, EngineOptions(backend="cpu", policy="moespeq", ram=12_000_000, draft_verdict=False))
    try:
        ids = eng.tokenizer.encode("Hello")
        eng.load(len(ids) + 8)
        tokens = [ev.token for ev in eng.generate(ids, 8, SamplingParams())]
        if not eng.draft_released:
            eng.release_draft()
        note = result_dict("demo", eng, ids, tokens)["governor_note"]
    finally:
        eng.close()
    assert note.startswith("draft released") and " of 32 in RAM)" in note and "device" not in note, note
