"""MoE-SpeQ: lossless speculative decoding on every family, the acceptance rule, and the
mock-clock figures of the ELB scheduler."""

import json

import pytest
import torch
from offload_helpers import FAMILIES, prompt_for, run_engine, vram_for_slots

from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.runtime.engine import Engine, EngineOptions
from moespeq_cli.runtime.planning.planner import draft_bytes_estimate
from moespeq_cli.runtime.sampling import SamplingParams
from moespeq_cli.runtime.speculative import accept_coupled, accept_greedy, accept_sampling


def spec_engine(path, k="auto", slots=None, context=40, draft="auto", **kw):
    """A moespeq engine on the mock; the governor decides at run time (the plan's verdict
    on the draft, ``draft_verdict``, has tests of its own)."""
    kw.setdefault("draft_verdict", False)
    ck = Checkpoint(path)
    vram = None
    if slots is not None:
        vram = vram_for_slots(path, slots, context, policy="moespeq") + draft_bytes_estimate(ck.config)
    eng = Engine(path, EngineOptions(backend="mock", policy="moespeq", spec_depth=k, vram=vram, draft=draft, **kw))
    eng.load(context)
    return eng


def tokens(eng, prompt, n, sampling=None):
    return [ev.token for ev in eng.generate(prompt, n, sampling or SamplingParams())]


@pytest.mark.parametrize("family,variant", FAMILIES)
def test_lossless_for_every_k(tiny, family, variant):
    path, _ = tiny(family, variant)
    prompt = prompt_for(1)
    expected, _ = run_engine(path, prompt, 24, backend="cpu")
    cfg = Checkpoint(path).config
    for k in ("1", "2", "4", "8", "auto"):
        for slots in (cfg.top_k + 1, cfg.num_experts * len(cfg.moe_layers)):
            eng = spec_engine(path, k, slots, context=len(prompt) + 24)
            assert tokens(eng, prompt, 24) == expected, (k, slots)
            s = eng.last_stats
            if k != "auto":
                assert s.acceptance_rate is not None and 0 <= s.acceptance_rate <= 1
                assert s.draft_routing_match is not None


def test_broken_draft_still_lossless(tiny):
    path, _ = tiny("mixtral", "top3")
    prompt = prompt_for(2)
    expected, _ = run_engine(path, prompt, 24, backend="cpu")
    good = spec_engine(path, "4", context=34)
    assert tokens(good, prompt, 24) == expected
    broken = spec_engine(path, "4", context=34)
    broken.draft_exec.quant.zero_()
    assert tokens(broken, prompt, 24) == expected
    assert broken.last_stats.acceptance_rate < good.last_stats.acceptance_rate
    assert broken.last_stats.seconds > good.last_stats.seconds  # only slower


def test_target_as_its_own_draft_accepts_everything(tiny):
    from moespeq_cli.runtime.executors.experts import InMemoryExperts

    path, _ = tiny("qwen2_moe", "shared")
    eng = spec_engine(path, "4", context=40)
    eng.set_draft(InMemoryExperts(eng.ckpt, eng.dtype))
    expected, _ = run_engine(path, prompt_for(3), 24, backend="cpu")
    assert tokens(eng, prompt_for(3), 24) == expected
    assert eng.last_stats.acceptance_rate == 1.0
    assert eng.last_stats.draft_routing_match == 1.0


def test_sampling_with_draft_is_reproducible(tiny):
    path, _ = tiny("olmoe", "base")
    s = SamplingParams(temperature=0.8, top_k=20, seed=3)
    a = tokens(spec_engine(path, "3"), prompt_for(4), 20, s)
    b = tokens(spec_engine(path, "3"), prompt_for(4), 20, s)
    assert a == b and len(a) == 20


@pytest.mark.parametrize("family,variant", [("mixtral", "top3"), ("olmoe", "base")])
def test_a_seeded_sample_is_the_same_whatever_the_draft_depth(tiny, family, variant):
    """With a seed, the tokens are plain decoding's with that seed, whatever depth the
    governor chose, a broken draft or none (drafter-invariant: a server's governor carries
    over between requests, and on a wall clock its choices follow timings)."""
    path, _ = tiny(family, variant)
    prompt = prompt_for(4)
    s = SamplingParams(temperature=1.0, top_p=0.95, seed=5)
    expected, _ = run_engine(path, prompt, 24, backend="cpu", sampling=s)
    assert len(set(expected)) > 3  # a sample, not one repeated token
    accepted = []
    for k in ("1", "2", "4", "auto"):
        eng = spec_engine(path, k, context=len(prompt) + 24)
        assert tokens(eng, prompt, 24, s) == expected, k
        if k != "auto":
            accepted.append(eng.last_stats.acceptance_rate)
    assert max(accepted) > 0.3  # the draft's proposals race with the target's noise: they agree
    broken = spec_engine(path, "4", context=len(prompt) + 24)
    broken.draft_exec.quant.zero_()
    assert tokens(broken, prompt, 24, s) == expected
    other = tokens(spec_engine(path, "2", context=len(prompt) + 24), prompt, 24, SamplingParams(1.0, 0.95, seed=6))
    assert other != expected  # the seed decides


@pytest.mark.parametrize("case", ["close", "far", "same"])
def test_coupled_verification_emits_the_targets_race(case):
    """Verification with a seed emits, at each position, the target's own race (so the
    first token is distributed as p[0] whatever q is), and accepts a drafted token at
    least (1 - TV) / (1 + TV) of the time where the draft raced with the same noise."""
    from moespeq_cli.runtime.sampling import Sampler, race

    g = torch.Generator().manual_seed(0)
    V, k = 5, 2
    p = torch.softmax(torch.randn(k + 1, V, generator=g), -1)
    q = {
        "same": p[:k].clone(),
        "close": torch.softmax(p[:k].log() + 0.5 * torch.randn(k, V, generator=g), -1),
        "far": torch.softmax(3 * torch.randn(k, V, generator=g), -1),
    }[case]
    n, counts, accepted = 20000, torch.zeros(V), 0
    for seed in range(n):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        drafted = [sampler.pick(q[i], 10 + i) for i in range(k)]
        m, nxt = accept_coupled(p, drafted, sampler, 10)
        plain = [race(p[i], sampler.key(10 + i)) for i in range(k + 1)]
        assert drafted[:m] + [nxt] == plain[: m + 1]  # what plain decoding picks there
        counts[plain[0]] += 1
        accepted += m >= 1
    freq = counts / n
    assert float((freq - p[0]).abs().sum()) / 2 < 0.02, (freq, p[0])
    tv = float((p[0] - q[0]).abs().sum()) / 2
    assert accepted / n >= (1 - tv) / (1 + tv) - 0.015
    if case == "same":
        assert accepted == n


def test_greedy_accept_rule():
    logits = torch.full((4, 6), -1.0)
    for i, t in enumerate([2, 5, 1, 3]):
        logits[i, t] = 1.0
    assert accept_greedy(logits, [2, 5, 1]) == (3, 3)
    assert accept_greedy(logits, [2, 4, 1]) == (1, 5)
    assert accept_greedy(logits, [0, 5, 1]) == (0, 2)


@pytest.mark.parametrize("case", ["close", "far", "same"])
def test_rejection_sampling_preserves_the_target_distribution(case):
    """The first token a cycle emits is distributed as the target's p[0], whatever q is."""
    g = torch.Generator().manual_seed(0)
    V, k = 5, 2
    p = torch.softmax(torch.randn(k + 1, V, generator=g), -1)
    if case == "same":
        q = p[:k].clone()
    elif case == "close":
        q = torch.softmax(p[:k].log() + 0.5 * torch.randn(k, V, generator=g), -1)
    else:
        q = torch.softmax(3 * torch.randn(k, V, generator=g), -1)
    n = 40000
    counts = torch.zeros(V)
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        drafted = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(k)]
        m, nxt = accept_sampling(p, q, drafted, gen)
        first = drafted[0] if m >= 1 else nxt
        counts[first] += 1
    freq = counts / n
    tv = float((freq - p[0]).abs().sum()) / 2
    assert tv < 0.015, (freq, p[0])
    chi2 = float(((counts - n * p[0]) ** 2 / (n * p[0])).sum())
    assert chi2 < 20.5  # chi-square, 4 degrees of freedom, p = 0.0004


def test_figures_at_the_same_vram_with_k4(tiny):
    """A tiny checkpoint with 16 experts per layer and a budget of half its experts:
    the ELB prefetch raises the hit rate at verification above gate-prefetch's and lru's
    and stalls less than lru (the same --vram: the draft is paid out of the slots). It no
    longer stalls less than gate-prefetch: with a layer's experts computed in one grouped
    call there are no per-expert launches left for a verification's late copies to hide
    behind (0.97 ms against 0.92; per-expert, 0.0 against 0.18)."""
    path, _ = tiny("mixtral", "wide")
    ck = Checkpoint(path)
    prompt = prompt_for(7, 12)
    ctx = len(prompt) + 48
    vram = vram_for_slots(path, 16, ctx) + draft_bytes_estimate(ck.config)
    figures = {}
    for policy in ("lru", "gate-prefetch", "moespeq"):
        eng = Engine(
            path, EngineOptions(backend="mock", policy=policy, spec_depth="4", vram=vram, hardware="laptop-8gb")
        )
        eng.load(ctx)
        tokens(eng, prompt, 48)
        figures[policy] = eng.last_stats
    assert figures["moespeq"].expert_hit_rate > figures["lru"].expert_hit_rate
    assert figures["moespeq"].expert_hit_rate > figures["gate-prefetch"].expert_hit_rate
    assert figures["moespeq"].io_stall_s < figures["lru"].io_stall_s
    assert figures["moespeq"].prefetch_precision > 0.5


def test_draft_that_does_not_fit(tiny, cli):
    """Without CPU experts the draft is dropped (k = 0); with them (the default) part of it
    is on the device, the rest runs on the CPU, and the tokens are still plain greedy's."""
    import json

    path, _ = tiny("mixtral", "wide")
    prompt = prompt_for(3)
    ck = Checkpoint(path)
    vram = vram_for_slots(path, 3, len(prompt) + 8)  # room for top-k slots, not for the draft too
    args = ("run", str(path), "--backend", "mock", "--vram", str(vram), "-n", "8", "--json")
    r = cli(*args, "-p", "no room", "--no-cpu-experts")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["plan"]["draft_bytes"] == 0 and "does not fit" in out["plan"]["note"]
    assert out["stats"]["spec_depth_mean"] == 0.0 and out["stats"]["acceptance_rate"] is None
    assert ck.config.num_experts == 16

    expected, _ = run_engine(path, prompt, 8, backend="cpu")
    eng = Engine(path, EngineOptions(backend="mock", policy="moespeq", spec_depth="2", vram=vram))
    eng.load(len(prompt) + 8)
    assert 0 < eng.plan.draft_device_experts < eng.plan.total_experts and "on the CPU" in eng.plan.note
    assert tokens(eng, prompt, 8) == expected
    assert eng.last_stats.acceptance_rate is not None
    host = [iv for iv in eng.backend.timeline.intervals if iv.stream == "host" and iv.phase == "draft"]
    assert host, "the draft computed none of its experts on the CPU"


def test_run_json_has_speculation_figures(tiny, cli):
    import json

    path, _ = tiny("mixtral", "top3")
    r = cli("run", str(path), "-p", "figures please", "-n", "16", "--backend", "mock", "--spec-depth", "3", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    s = out["stats"]
    for key in (
        "acceptance_rate",
        "mean_accepted",
        "spec_depth_mean",
        "expert_hit_rate",
        "io_stall_s",
        "bytes_h2d",
        "draft_routing_match",
    ):
        assert s[key] is not None, key
    assert out["policy"] == "moespeq" and out["draft"] == "quantized in memory"
    assert set(out["spec_depths"]) <= {2, 3}  # k, capped near the end by the tokens left


@pytest.mark.parametrize("depth", ["12", "64"])
def test_a_fixed_depth_past_the_governors_range_runs_losslessly(tiny, cli, depth):
    """--spec-depth takes 0 to 64, but the governor's acceptance table held the default
    range (8): a depth of 9 or more stopped with an IndexError once a draft's tokens were
    accepted deep enough. A long verification block (up to 65 tokens) gives plain greedy."""
    import json

    path, _ = tiny("mixtral", "gqa")
    args = ("run", str(path), "-p", "hello", "-n", "150", "--backend", "mock", "--vram", "8MiB", "--json")
    r = cli(*args, "--spec-depth", depth)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    plain = json.loads(cli(*args, "--draft", "none").stdout)
    assert out["token_ids"] == plain["token_ids"] and max(out["spec_depths"]) == min(int(depth), 150 - 1)


@pytest.mark.parametrize("bad", ["-1", "many", "65"])
def test_bad_spec_depth(tiny, cli, bad):
    path, _ = tiny("mixtral", "gqa")
    r = cli("run", str(path), "-n", "2", "--backend", "mock", "--spec-depth", bad)
    assert r.exit_code == 2 and "--spec-depth" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("cpu_experts", [False, True])
def test_useless_draft_gives_its_memory_to_expert_slots(tiny, cpu_experts):
    """A zeroed draft (nothing accepted) on a budget where its memory could hold more
    experts: the governor releases it, the cache grows, the tokens stay plain greedy's.
    With CPU experts a miss may never be copied, so the new slots would stay empty: they
    are filled at release, with the experts the target has routed most."""
    path, _ = tiny("mixtral", "wide")
    prompt = prompt_for(8)
    n = 40
    expected, _ = run_engine(path, prompt, n, backend="cpu")
    eng = spec_engine(path, "auto", slots=4, context=len(prompt) + n, cpu_experts=cpu_experts)
    eng.draft_exec.quant.zero_()
    slots_before = eng.cache.slots
    free_after_release = []
    most_routed, filled = [], []

    def release():
        trace = eng.target_exec.trace
        assert trace.tokens >= len(prompt)  # the prompt's tokens and the verified ones
        most_routed.extend(trace.most_routed(eng.spare_slots(), set(eng.cache.slot_of)))
        eng.release_draft()
        free_after_release.append(len(eng.cache.free_slots))
        filled.extend(key for key in most_routed if eng.cache.resident(key))

    eng.scheduler.on_release = release
    assert eng.governor.state.spare_slots > 0
    assert tokens(eng, prompt, n) == expected
    assert eng.draft_released and eng.cache.slots == slots_before + eng.governor.state.spare_slots
    assert eng.backend.used <= eng.backend.capacity
    assert eng.governor.history[-1] == 0
    assert free_after_release == [0 if cpu_experts else eng.governor.state.spare_slots]
    assert eng.target_exec.trace is None  # nothing left to decide
    if cpu_experts:
        assert most_routed and filled == most_routed


def test_gate_prefetchs_recall_is_measured_on_decoded_tokens_only(tiny):
    """The release estimate credits gate-prefetch's guesses by their recall on decoded
    tokens; a prompt's guess (the union over all its tokens) would catch nearly every
    expert, so passes of several tokens record none."""
    path, _ = tiny("mixtral", "wide")
    prompt = prompt_for(8)
    eng = spec_engine(path, "auto", slots=4, context=len(prompt) + 24)
    trace, top_k = eng.target_exec.trace, Checkpoint(path).config.top_k
    assert trace is not None
    guessed = []
    record = trace.guess
    trace.guess = lambda layer, experts: (guessed.append(len(experts)), record(layer, experts))
    tokens(eng, prompt, 24)
    assert guessed and set(guessed) == {top_k}  # one decoded token's guess each time
    assert 0.0 <= trace.guess_recall() <= 1.0


def test_a_depth_of_0_plans_no_draft(tiny, cli):
    """``--spec-depth 0`` never drafts: the draft's memory holds experts, as with
    ``--draft none`` (it held the draft and half the slots)."""
    path, _ = tiny("mixtral", "wide")

    def plan(*args):
        out = json.loads(cli("run", str(path), "-n", "4", "--vram", "2MB", "--json", *args).stdout)
        return out["plan"]

    none, zero, two = plan("--draft", "none"), plan("--spec-depth", "0"), plan("--spec-depth", "2")
    assert zero["draft_bytes"] == none["draft_bytes"] == 0 < two["draft_bytes"]
    assert zero["slots"] == none["slots"] > two["slots"]
