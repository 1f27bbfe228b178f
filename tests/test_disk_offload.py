"""The disk tier at work: experts read from the checkpoint's files into a RAM budget.

On the cpu backend (``--ram`` below the experts' size) every policy runs for real on the
wall clock and gives the plain reference's tokens, for every family, down to top-k RAM
slots; on the mock three tiers (disk -> RAM -> device) do too, with every copy of an
expert that was on disk starting after its read. Reads are asynchronous (a slowed reader
leaves the tokens alone and overlaps compute), the RAM budget bounds the process's
memory, and the mock's disk timing is deterministic."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from offload_helpers import FAMILIES, prompt_for, run_engine, vram_for_slots

from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.runtime.engine import Engine, EngineOptions
from moespeq_cli.runtime.planning.planner import checkpoint_plan, draft_bytes_estimate
from moespeq_cli.runtime.sampling import SamplingParams
from moespeq_cli.runtime.scheduling.governor import explain


def ram_for(path, slots: int, draft: bool = False) -> int:
    """--ram that holds ``slots`` full-precision experts (and the 4-bit draft): a RAM slot
    is the expert in whole pages, for reads that land in place."""
    ck = Checkpoint(path)
    plan = checkpoint_plan(ck, 16)
    return slots * plan.ram_slot_bytes + (draft_bytes_estimate(ck.config) if draft else 0)


def disk_run(path, prompt, n, policy, ram, backend="cpu", **kw):
    eng = Engine(path, EngineOptions(backend=backend, policy=policy, ram=ram, **dict(kw, draft_verdict=False)))
    eng.load(len(prompt) + n)
    try:
        return [ev.token for ev in eng.generate(prompt, n, SamplingParams())], eng
    finally:
        eng.close()


@pytest.mark.parametrize("family,variant", FAMILIES)
def test_every_policy_on_the_disk_tier_gives_the_reference_tokens(tiny, family, variant):
    path, _ = tiny(family, variant)
    prompt = prompt_for(11, 10)
    expected, ref = run_engine(path, prompt, 20, backend="cpu")
    assert ref.backend is None  # every expert fits: the plain reference
    cfg = Checkpoint(path).config
    total = cfg.num_experts * len(cfg.moe_layers)
    for slots in (cfg.top_k, total // 2):
        for policy, kw in (
            ("lru", {}),
            ("gate-prefetch", {}),
            ("ondemand", {}),
            ("moespeq", {"spec_depth": "2"}),
            ("moespeq", {"spec_depth": "auto"}),
        ):
            draft = policy == "moespeq"
            got, eng = disk_run(path, prompt, 20, policy, ram_for(path, slots, draft), **kw)
            assert got == expected, (policy, kw, slots)
            s = eng.last_stats
            assert eng.backend.name == "cpu" and s.clock == "wall" and eng.plan.disk_tier
            assert eng.plan.slots == (min(slots, cfg.top_k) if policy == "ondemand" else slots)
            assert s.bytes_read > 0 and s.bytes_h2d is None and s.io_stall_s >= 0
            assert eng.cache.slots * eng.tiers.nbytes <= eng.plan.budget_bytes
            if draft and kw["spec_depth"] == "2":
                assert s.acceptance_rate is not None  # the draft fit beside the slots, and drafted


@pytest.mark.parametrize("family,variant", FAMILIES)
def test_three_tiers_on_the_mock(tiny, family, variant):
    """disk -> RAM -> device: a few RAM slots, fewer device slots; every policy gives the
    reference's tokens, and no copy of an expert that was read starts before its read."""
    path, _ = tiny(family, variant)
    prompt = prompt_for(12, 10)
    n = 20
    expected, _ = run_engine(path, prompt, n, backend="cpu")
    cfg = Checkpoint(path).config
    ctx = len(prompt) + n
    for policy, kw in (
        ("lru", {}),
        ("gate-prefetch", {}),
        ("ondemand", {}),
        ("hybrid", {}),
        ("moespeq", {"spec_depth": "2", "cpu_experts": False}),
        ("moespeq", {"spec_depth": "auto"}),
    ):
        vram = vram_for_slots(path, cfg.top_k, ctx, policy=policy)
        if policy == "moespeq":
            vram += draft_bytes_estimate(cfg)
        got, eng = disk_run(path, prompt, n, policy, ram_for(path, cfg.top_k + 2), backend="mock", vram=vram, **kw)
        assert got == expected, (policy, kw)
        assert eng.plan.disk_tier and eng.tiers.host.slots == cfg.top_k + 2
        ivs = eng.backend.timeline.intervals
        reads = [iv for iv in ivs if iv.kind == "read"]
        assert reads and eng.last_stats.bytes_read == sum(iv.bytes for iv in reads)
        for copy in (iv for iv in ivs if iv.kind == "copy"):
            before = [r for r in reads if (r.layer, r.expert) == (copy.layer, copy.expert) and r.start <= copy.start]
            if before:  # the latest read of this expert before the copy has landed first
                assert max(before, key=lambda r: r.start).end <= copy.start + 1e-12, (policy, copy)


def test_the_mock_disk_tier_is_deterministic(tiny):
    path, _ = tiny("mixtral", "top3")
    prompt = prompt_for(13, 8)
    runs = []
    for _ in range(2):
        _, eng = disk_run(path, prompt, 12, "moespeq", ram_for(path, 4), backend="mock", spec_depth="auto")
        runs.append(([(iv.name, iv.start, iv.end) for iv in eng.backend.timeline.intervals], eng.last_stats))
    assert runs[0] == runs[1]


def test_shards_renamed_over_after_opening_are_not_read(tiny, tmp_path):
    """New shards renamed into place after the engine opened the checkpoint (a download
    finishing beside a run) are not read: the disk tier reads the files held open."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, ref = tiny("mixtral", "wide")
    path = tmp_path / "ckpt"
    ref.save_pretrained(path, max_shard_size="100KB", safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).exists():
            shutil.copy(src / f, path / f)
    prompt = prompt_for(14, 8)
    expected, _ = run_engine(path, prompt, 12, backend="cpu")
    eng = Engine(path, EngineOptions(backend="cpu", policy="gate-prefetch", ram=ram_for(path, 4)))
    try:
        for shard in path.glob("*.safetensors"):
            save_file({k: torch.zeros_like(v) for k, v in load_file(shard).items()}, tmp_path / "new")
            os.replace(tmp_path / "new", shard)
        eng.load(len(prompt) + 12)
        got = [ev.token for ev in eng.generate(prompt, 12, SamplingParams())]
    finally:
        eng.close()
    assert eng.backend.reader.bytes_read > 0  # the experts came from the disk tier
    assert got == expected


def test_reads_are_asynchronous_and_overlap_compute(tiny):
    """A reader slowed to 20 ms a read: the tokens do not change, reads run while the CPU
    computes (the timeline shows a compute interval inside a read), and the waits are
    stall."""
    path, _ = tiny("mixtral", "wide")
    prompt = prompt_for(14, 8)
    expected, _ = run_engine(path, prompt, 12, backend="cpu")
    eng = Engine(path, EngineOptions(backend="cpu", policy="gate-prefetch", ram=ram_for(path, 6)))
    eng.load(len(prompt) + 12)
    eng.backend.reader.delay_s = 0.02
    try:
        got = [ev.token for ev in eng.generate(prompt, 12, SamplingParams())]
    finally:
        eng.close()
    assert got == expected
    ivs = eng.backend.timeline.intervals
    reads = [iv for iv in ivs if iv.stream == "disk"]
    computes = [iv for iv in ivs if iv.stream == "compute" and iv.kind == "compute"]
    overlapped = sum(
        max(0.0, min(r.end, c.end) - max(r.start, c.start)) for r in reads for c in computes if c.start < r.end
    )
    assert reads and overlapped > 0
    assert eng.last_stats.io_stall_s > 0.01


def test_the_draft_is_quantized_from_the_files(tiny):
    """The in-memory draft is built from reads of the checkpoint (one expert at a time)
    and equals one built from the tensors safetensors hands out."""
    from moespeq_cli.quant.draft import QuantizedExperts

    path, _ = tiny("qwen2_moe", "shared")
    ck = Checkpoint(path)
    q = QuantizedExperts.quantize(ck, "nf4", 64, torch.float32)
    bnb = pytest.importorskip("bitsandbytes.functional")
    for layer, e in [(0, 0), (1, 5)]:
        for (packed, _state), w in zip(q.q[(layer, e)], ck.expert(layer, e, torch.float32), strict=True):
            want, _ = bnb.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4")
            assert torch.equal(packed, want)


def make_big_checkpoint(out: Path, hidden=768, inter=2048, layers=6, experts=8) -> int:
    """A Mixtral-shaped bf16 checkpoint with random weights, written directly (no
    transformers): a few hundred MB of experts, little else. Returns the experts' bytes."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_models

    g = torch.Generator().manual_seed(0)
    vocab = tiny_models.VOCAB
    cfg = dict(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        torch_dtype="bfloat16",
        tie_word_embeddings=False,
    )
    head = hidden // 4

    def rnd(*shape, std=0.05):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    t = {
        "model.embed_tokens.weight": rnd(vocab, hidden, std=1.0),
        "lm_head.weight": rnd(vocab, hidden),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        t[p + "self_attn.q_proj.weight"] = rnd(hidden, hidden)
        t[p + "self_attn.k_proj.weight"] = rnd(head, hidden)
        t[p + "self_attn.v_proj.weight"] = rnd(head, hidden)
        t[p + "self_attn.o_proj.weight"] = rnd(hidden, hidden)
        t[p + "block_sparse_moe.gate.weight"] = rnd(experts, hidden, std=0.5)
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            t[q + "w1.weight"] = rnd(inter, hidden)
            t[q + "w3.weight"] = rnd(inter, hidden)
            t[q + "w2.weight"] = rnd(hidden, inter)
    out.mkdir(parents=True, exist_ok=True)
    save_file(t, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "tokenizer.json").write_text(json.dumps(tiny_models.byte_tokenizer_json()))
    return layers * experts * 3 * hidden * inter * 2


def test_a_quarter_ram_budget_bounds_the_process_memory(tmp_path):
    """400 MB of bf16 experts and --ram a quarter of that: the run's peak RSS stays far
    below the checkpoint (the experts are never all in memory, nor in the page cache's
    share of this process), measured in a fresh process."""
    ckpt = tmp_path / "big"
    experts = make_big_checkpoint(ckpt)
    assert experts > 350e6
    ram = experts // 4
    code = (
        "import resource, sys, json\n"
        "from moespeq_cli.cli.app import main\n"
        "sys.argv = ['moespeq'] + sys.argv[1:]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print(json.dumps({'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'code': code}), file=sys.stderr)\n"
    )
    base = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, torch, moespeq_cli.runtime.engine; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    baseline = int(base.stdout.strip())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "run",
            str(ckpt),
            "--backend",
            "cpu",
            "--ram",
            str(ram),
            "--policy",
            "lru",
            "-n",
            "6",
            "-p",
            "hello",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    result = json.loads(r.stderr.strip().splitlines()[-1])
    assert result["code"] in (0, None), r.stderr
    out = json.loads(r.stdout)
    assert out["stats"]["bytes_read"] > 0 and out["plan"]["disk_tier"]
    non_expert = out["plan"]["non_expert_bytes"] * 2  # float32 numerics: the bf16 weights widened
    growth = result["rss"] - baseline
    assert growth < ram + non_expert + 120e6, (growth, ram, non_expert)
    assert result["rss"] < baseline + experts * 0.6


def test_belady_is_the_floor_of_every_cache():
    """The benchmark's fewest-reads figure: Belady's MIN, checked against brute force over
    every eviction choice on short random traces."""
    import itertools
    import random

    from moespeq_cli.runtime.bench import belady_misses

    def brute(uses, slots, cache=frozenset()):
        if not uses:
            return 0
        key, rest = uses[0], uses[1:]
        if key in cache:
            return brute(rest, slots, cache)
        if len(cache) < slots:
            return 1 + brute(rest, slots, cache | {key})
        return 1 + min(brute(rest, slots, (cache - {v}) | {key}) for v in cache)

    rng = random.Random(0)
    for _ in range(40):
        uses = [rng.randrange(5) for _ in range(9)]
        slots = rng.randrange(1, 4)
        assert belady_misses(uses, slots) == brute(uses, slots), (uses, slots)
    assert belady_misses([1, 2, 3, 4, 1, 2], 3, [1, 2, 3]) == 1  # a warm start counts
    assert all(belady_misses(list(p), 2) == 3 for p in itertools.permutations([1, 2, 3]))


def test_the_governor_gives_back_the_drafts_ram_where_the_disk_costs_more():
    """Three tiers on the mock where the draft's 4-bit experts take half of a small --ram:
    speculating loses to plain decoding with that RAM holding full-precision experts (fewer
    reads from disk). `plan` now sees it and leaves the draft out (`run` gives 835 tok/s,
    as without a draft); kept in regardless (no plan-time verdict), the governor, counting
    the RAM it would gain, releases the draft after its warm-up and one look at the best
    depth (when only the device's slots counted it speculated 11 cycles first, 9 of them
    deep: 615 tok/s, now 719). The tokens are lru's."""
    from moespeq_cli.cli.run import DEMO_PROMPT
    from moespeq_cli.model_ref import DEMO_DIR

    def engine(policy, **kw):
        opts = EngineOptions(backend="mock", hardware="laptop-8gb", vram=16_000_000, ram=8_000_000, policy=policy, **kw)
        return Engine(DEMO_DIR, opts)

    def generate(eng):
        ids = eng.tokenizer.encode(DEMO_PROMPT)
        eng.load(len(ids) + 128)
        return [ev.token for ev in eng.generate(ids, 128, SamplingParams())]

    eng = engine("moespeq", draft_verdict=False)
    try:
        got = generate(eng)
        assert eng.plan.disk_tier and eng.plan.host_draft_bytes > eng.plan.host_budget_bytes // 2
        assert eng.spec.released and "in RAM" in explain(eng.spec.governor, released=True)
        assert sum(1 for k in eng.spec.governor.history if k) <= 4  # the warm-up's two, the best depth's two
    finally:
        eng.close()
    lru = engine("lru")
    try:
        assert got == generate(lru)
    finally:
        lru.close()


def test_token_times_and_the_timeline_count_from_one_origin(tiny):
    """On the wall clock the stats' token times and the trace's intervals share the
    backend's zero: no token is stamped before the pass that produced it ended (the
    token times counted from the prefill's start, a millisecond after the trace's)."""
    path, _ = tiny("mixtral", "wide")
    prompt = prompt_for(14, 8)
    for policy in ("lru", "moespeq"):
        _, eng = disk_run(path, prompt, 6, policy, ram_for(path, 6, draft=policy == "moespeq"))
        heads = sorted(iv.end for iv in eng.backend.timeline.intervals if iv.name.startswith("lm_head"))
        s = eng.last_stats
        assert heads and heads[0] <= s.ttft_s and heads[-1] <= s.seconds, (policy, heads[0], s.ttft_s)


def test_the_trace_draws_reads_in_flight_together_in_lanes_of_their_own(tiny):
    """Reads in flight together were one thread's events half over each other (a trace
    viewer draws them wrong): each is in a lane where reads follow one another."""
    path, _ = tiny("mixtral", "wide")
    prompt = prompt_for(14, 8)
    eng = Engine(path, EngineOptions(backend="cpu", policy="gate-prefetch", ram=ram_for(path, 6)))
    eng.load(len(prompt) + 12)
    eng.backend.reader.delay_s = 0.01  # reads long enough to be in flight together
    try:
        [ev.token for ev in eng.generate(prompt, 12, SamplingParams())]
    finally:
        eng.close()
    trace = eng.backend.timeline.chrome_trace()["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in trace if e["ph"] == "M" and e["name"] == "thread_name"}
    reads = [e for e in trace if e["ph"] == "X" and e["cat"] == "read"]
    lanes = {e["tid"] for e in reads}
    assert len(reads) == sum(iv.kind == "read" for iv in eng.backend.timeline.intervals)
    assert len(lanes) > 1 and all(names[t].startswith("disk") for t in lanes)
    for tid in lanes:
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in reads if e["tid"] == tid)
        assert all(b[0] >= a[1] - 1e-3 for a, b in zip(spans, spans[1:], strict=False)), tid


def test_bench_frees_a_policys_memory_before_the_next_loads(tiny, monkeypatch):
    """bench held two policies' RAM tiers at once (1.9 GB where one run takes 1.1): an
    engine's tiers are reference cycles the collector freed late. Each run's engine is
    gone before the next one loads."""
    import weakref

    from moespeq_cli.runtime import bench

    path, _ = tiny("mixtral", "wide")
    prompt = prompt_for(9, 4)
    engines: list[weakref.ref] = []  # each run's model and memory tiers
    load = Engine.load

    def loading(self, *a, **k):
        assert all(ref() is None for ref in engines), "an earlier policy's model or tiers are still held"
        done = load(self, *a, **k)
        engines.extend([weakref.ref(self.model), weakref.ref(self.tiers)])
        return done

    monkeypatch.setattr(Engine, "load", loading)
    opts = EngineOptions(backend="cpu", ram=ram_for(path, 4), draft_verdict=False)
    import gc

    gc.disable()  # the collector's own timing is luck: a large run allocates too few objects to trigger it
    try:
        results = bench.bench(path, prompt, 4, ["moespeq", "lru", "gate-prefetch"], opts)
    finally:
        gc.enable()
    assert len(results) == 3 and len(engines) == 6  # moespeq first: its scheduler's hook held it


@pytest.mark.parametrize("policy", ["lru", "moespeq"])
def test_a_failed_read_leaves_the_engine_ready_for_the_next_generation(tiny, tmp_path, policy):
    """A shard cut short while `serve` runs: that request fails; once the file is whole
    again (the same bytes and times) the next one is answered, with the reference tokens.
    The failed pass left its layer's pins and its failed reads in the RAM tier: every later
    request failed ("every RAM expert slot is pinned", or the old read's error again)."""
    import shutil

    from moespeq_cli.errors import CheckpointError

    src, _ = tiny("mixtral", "wide")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    prompt, n = prompt_for(7, 12), 24
    eng = Engine(
        path, EngineOptions(backend="cpu", policy=policy, ram=ram_for(path, 4, draft=True), draft_verdict=False)
    )
    eng.load(len(prompt) + n)
    try:
        want = [ev.token for ev in eng.generate(prompt, n, SamplingParams())]
        shard = next(path.glob("*.safetensors"))
        whole, st = shard.read_bytes(), shard.stat()
        with open(shard, "r+b") as fh:
            fh.truncate(len(whole) // 3)
        with pytest.raises(CheckpointError):
            list(eng.generate(prompt, n, SamplingParams()))
        shard.write_bytes(whole)
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
        for _ in range(2):
            assert [ev.token for ev in eng.generate(prompt, n, SamplingParams())] == want
        assert not any(cache.pinned for cache in (eng.tiers.compute, eng.tiers.host) if cache is not None)
    finally:
        eng.close()
