"""The 4-bit draft: its matmul path against dequantize-then-matmul, saving, loading, and
refusing a draft built from other weights."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.quant.draft import QuantizedExperts
from moespeq_cli.quant.draft_store import default_draft_dir
from moespeq_cli.runtime.executors.experts import expert_mlp


def codes(packed: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' 4-bit codes, two a byte (the first in the high nibble), as indices."""
    flat = packed.flatten()
    return torch.stack((flat >> 4, flat & 15), -1).flatten().long()


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_path_equals_dequantize_then_matmul(tiny, method, dtype):
    path, _ = tiny("mixtral", "top3")
    ck = Checkpoint(path)
    q = QuantizedExperts.quantize(ck, method, 64, dtype)
    x = torch.randn(5, ck.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    for layer, e in [(0, 0), (1, 7)]:
        (gp, gs), (up, us), (dp, ds) = q.q[(layer, e)]
        # each weight table[code] * absmax (bitsandbytes' CPU dequantize is wrong at these widths)
        g, u, d = (
            (s.code[codes(p)] * s.absmax.repeat_interleave(64)[: s.shape.numel()]).view(s.shape).to(dtype)
            for p, s in ((gp, gs), (up, us), (dp, ds))
        )
        reference = F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
        assert torch.equal(q.forward_reference(layer, e, x), reference)
        assert torch.equal(q.forward(layer, e, x), reference)  # no fast path fits these shapes
        full = expert_mlp(x, *ck.expert(layer, e, dtype))
        err = float((q.forward(layer, e, x).float() - full.float()).norm() / full.float().norm())
        assert err < 0.3  # 4-bit: about 0.1 per weight matrix, compounded over three


def test_save_load_roundtrip_and_cli(tiny, cli, tmp_path):
    src, _ = tiny("qwen2_moe", "shared")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    r = cli("quantize", str(path), "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    draft = default_draft_dir(path, "nf4", 64)
    assert out["draft"] == str(draft) and (draft / "manifest.json").is_file()
    manifest = json.loads((draft / "manifest.json").read_text())
    assert manifest["method"] == "nf4" and manifest["blocksize"] == 64 and manifest["source_fingerprint"]
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind
    ck = Checkpoint(path)
    saved, fresh = QuantizedExperts.load(draft, ck), QuantizedExperts.quantize(ck)
    x = torch.randn(3, ck.config.hidden_size)
    assert torch.equal(saved.forward(1, 2, x), fresh.forward(1, 2, x))
    # run --draft auto finds it
    r = cli("run", str(path), "-p", "draft", "-n", "6", "--backend", "mock", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["draft"] == str(draft)


def test_run_finds_a_draft_saved_with_other_options(tiny, cli, tmp_path):
    """`quantize --method fp4 --blocksize 128` (its help's own example) saves a draft that
    `run --draft auto` must find and plan for; it quantized again in memory, with nf4 and
    64, on every run. Where the default draft is there too, that one is loaded."""
    src, _ = tiny("mixtral", "gqa")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    assert cli("quantize", str(path), "--method", "fp4", "--blocksize", "128").exit_code == 0
    args = ("run", str(path), "-p", "draft", "-n", "6", "--backend", "mock", "--spec-depth", "2", "--json")
    out = json.loads(cli(*args).stdout)
    fp4 = default_draft_dir(path, "fp4", 128)
    assert out["draft"] == str(fp4)
    assert out["plan"]["draft_bytes"] == QuantizedExperts.load(fp4, Checkpoint(path)).total_bytes
    # plan sizes the draft run loads
    planned = json.loads(cli("plan", str(path), "-p", "draft", "-n", "6", "--json").stdout)["policies"]
    assert next(r for r in planned if r["policy"] == "moespeq")["plan"]["draft_bytes"] == out["plan"]["draft_bytes"]
    # a draft this version cannot load, or one of other weights, is not taken up unasked
    manifest = json.loads((fp4 / "manifest.json").read_text())
    for edit in ({"format_version": 99}, {"source_fingerprint": "0" * 64}):
        (fp4 / "manifest.json").write_text(json.dumps(manifest | edit))
        assert json.loads(cli(*args).stdout)["draft"] == "quantized in memory"
    (fp4 / "manifest.json").write_text(json.dumps(manifest))
    assert cli("quantize", str(path)).exit_code == 0
    assert json.loads(cli(*args).stdout)["draft"] == str(default_draft_dir(path, "nf4", 64))


def test_mismatched_draft_is_refused(tiny, cli, tmp_path):
    a, _ = tiny("mixtral", "gqa")
    b, _ = tiny("mixtral", "top1")
    out = tmp_path / "draft"
    assert cli("quantize", str(a), "--out", str(out)).exit_code == 0
    r = cli("run", str(b), "-p", "x", "-n", "4", "--backend", "mock", "--draft", str(out))
    assert r.exit_code == 2 and "different checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "give this checkpoint's draft (or leave --draft out)" in r.stderr


def test_quantize_bad_options(tiny, cli):
    path, _ = tiny("mixtral", "gqa")
    r = cli("quantize", str(path), "--method", "int3")
    assert r.exit_code == 2 and "nf4" in r.stderr
    r = cli("quantize", str(path), "--blocksize", "100")
    assert r.exit_code == 2 and "--blocksize" in r.stderr


def test_draft_memory_is_about_a_quarter_of_bf16(tiny):
    path, _ = tiny("mixtral", "wide", torch.bfloat16)
    ck = Checkpoint(path)
    q = QuantizedExperts.quantize(ck)
    full = ck.config.expert_params * 2 * len(q.q)
    assert 0.25 < q.total_bytes / full < 0.31
    from moespeq_cli.runtime.planning.planner import draft_bytes_estimate

    assert abs(draft_bytes_estimate(ck.config) - q.total_bytes) / q.total_bytes < 0.02


def test_demo_draft_goes_to_the_cache_not_the_package(monkeypatch, tmp_path):
    from moespeq_cli.model_ref import DEMO_DIR

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = default_draft_dir(DEMO_DIR, "nf4", 64)
    assert tmp_path in d.parents and d.name.endswith("demo.moespeq-draft-nf4-b64")
    beside = default_draft_dir(tmp_path / "ckpt", "fp4", 128)
    assert beside == tmp_path / "ckpt.moespeq-draft-fp4-b128"


def test_the_packed_cpu_kernel_equals_dequantize_then_matmul(tmp_path):
    """bitsandbytes' packed AVX-512 BF16 kernel (what the draft runs on this CPU) against
    the reference, for every batch size verification uses, on shapes the kernel takes."""
    import bitsandbytes.functional as bnb

    h, i = 128, 192
    g = torch.Generator().manual_seed(3)
    q = {}
    for key in [(0, 0), (0, 1)]:
        q[key] = [
            bnb.quantize_4bit((torch.randn(*shape, generator=g) * 0.05).contiguous(), blocksize=64, quant_type="nf4")
            for shape in ((i, h), (i, h), (h, i))
        ]
    qe = QuantizedExperts(q, "nf4", 64, torch.float32, h, i)
    qe.use_kernel = False  # bitsandbytes' kernel (moespeq's own is the default where it builds)
    if not qe.packable():
        pytest.skip("this CPU has no AVX-512 BF16: the draft runs the reference path here")
    xs = [torch.randn(n, h, generator=g) for n in range(1, 10)]
    refs = [qe.forward_reference(0, 1, x) for x in xs]
    assert qe.pack_cpu({(0, 1)}) == 1 and qe.cpu_packed == {(0, 1)}
    for x, ref in zip(xs, refs, strict=True):
        got = qe.forward(0, 1, x)
        assert got.dtype == x.dtype and got.shape == ref.shape
        err = float((got - ref).norm() / ref.norm())
        assert err < 2e-2, err  # bf16 activations in the kernel; the reference computes in float32
    with pytest.raises(RuntimeError, match="packed"):
        qe.to(torch.device("meta"))  # a packed expert (its scales rounded to bf16) never leaves the CPU
    assert torch.equal(qe.forward(0, 0, xs[0]), qe.forward_reference(0, 0, xs[0]))  # (0, 0) was not packed


@pytest.mark.parametrize("shape", [(192, 128), (128, 192), (64, 64), (96, 320)])
def test_our_cpu_packing_equals_bitsandbytes_converter(shape):
    """quant/cpu_layout.pack_for_cpu makes bitsandbytes' packed CPU layout in one pass:
    the same bytes, the same scales and the same state fields as bitsandbytes' own
    converter, for both the float32 and the bf16 states a draft holds."""
    import copy

    import bitsandbytes.functional as bnb

    from moespeq_cli.quant.cpu_layout import pack_for_cpu

    if not hasattr(bnb, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes has no packed CPU layout")
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(*shape, generator=g) * 0.05).to(dtype).contiguous()
        q, s = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
        ref, ref_state = bnb._convert_weight_packed_for_cpu(q.clone(), copy.deepcopy(s))
        got, state = pack_for_cpu(q.clone(), copy.deepcopy(s), bnb)
        assert torch.equal(got, ref) and got.shape == ref.shape
        assert torch.equal(state.absmax, ref_state.absmax) and state.absmax.dtype == ref_state.absmax.dtype
        assert vars(state).keys() == vars(ref_state).keys()
        for name, value in vars(ref_state).items():
            if not isinstance(value, torch.Tensor):
                assert getattr(state, name) == value, name


def test_quantize_offline_says_only_what_it_did(tiny, tmp_path):
    """With HF_HUB_OFFLINE=1 (how many run offline) bitsandbytes' kernel loader logged
    "Skipping publisher trust check ..." on every quantize: stderr is moespeq's lines only."""
    import os
    import subprocess
    import sys

    path, _ = tiny("mixtral", "gqa")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "moespeq_cli", "quantize", str(path), "--out", str(tmp_path / "d")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("quantized") and "on disk" in lines[0], r.stderr
    assert lines[1] == f"`moespeq run {path} --draft {tmp_path / 'd'}` uses it"  # --out: how to use it


def test_a_draft_without_its_manifest_is_said_not_skipped(tiny, cli, tmp_path):
    """quantize renames a whole draft in, so a draft directory without manifest.json is
    damaged: run says so and how to rebuild it (it quantized again in memory, silently),
    and quantize rebuilds it in place."""
    src, _ = tiny("mixtral", "gqa")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    assert cli("quantize", str(path)).exit_code == 0
    draft = default_draft_dir(path, "nf4", 64)
    (draft / "manifest.json").unlink()
    args = ("run", str(path), "-p", "x", "-n", "4", "--backend", "mock", "--spec-depth", "2")
    r = cli(*args)
    assert r.exit_code == 1 and "no manifest.json" in r.stderr and "moespeq quantize" in r.stderr
    assert cli("quantize", str(path)).exit_code == 0 and (draft / "manifest.json").is_file()
    assert cli(*args).exit_code == 0


def test_an_unwritable_draft_place_is_usage_only_when_given(tiny, tmp_path, monkeypatch):
    """A given --out that cannot be written is the user's to change (exit 2); the default
    place beside the checkpoint or in the cache is this machine's (exit 1), as a full disk is."""
    import errno
    import tempfile

    from moespeq_cli.errors import MoespeqError, UsageError
    from moespeq_cli.quant import draft_store as d

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    for stale_ok, wanted in ((False, UsageError), (True, MoespeqError)):
        with pytest.raises(MoespeqError, match="cannot write there") as e:
            with d.draft_lock(tmp_path / "out", "fp", stale_ok=stale_ok):
                pass
        assert isinstance(e.value, UsageError) == (wanted is UsageError)


QUANTIZE_PEAK = """
import resource, sys
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.quant.draft import QuantizedExperts, _bnb
ck = Checkpoint(sys.argv[1])
_bnb()  # (its import is not the draft's memory)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
QuantizedExperts.quantize(ck)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_quantizing_holds_about_the_draft_not_the_experts_freed_temporaries(tmp_path):
    """glibc keeps the heap's freed blocks of a few MiB (an expert's temporaries, quantizing
    it): quantizing 151 MiB of experts grew the process by 404 MiB (1.8 GB for a 0.7 GB
    model, and a run that quantized its draft in memory held 7x its --ram). Each expert's
    are given back now: the growth is the draft (~40 MiB) and one expert's work."""
    import ctypes
    import subprocess
    import sys
    from pathlib import Path

    try:
        ctypes.CDLL(None).malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc: its allocator behaves otherwise")
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_checkpoint.py"
    ckpt = tmp_path / "mid"
    args = ["--hidden", "512", "--intermediate", "1536", "--layers", "2", "--experts", "16", "--dtype", "bfloat16"]
    subprocess.run([sys.executable, str(script), str(ckpt), *args], check=True, capture_output=True, timeout=300)
    experts = 2 * 16 * 3 * 512 * 1536 * 2
    grown = int(subprocess.run([sys.executable, "-c", QUANTIZE_PEAK, str(ckpt)], capture_output=True, text=True,
                               check=True, timeout=300).stdout)  # fmt: skip
    assert grown < 1.6 * experts, (grown / 2**20, experts / 2**20)


QUANTIZE_GROWTH = """
import re, sys
from pathlib import Path
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.quant.draft import QuantizedExperts, quantized_experts, write_draft
ck = Checkpoint(sys.argv[1])
rss = []
def progress(done, total):  # as each expert is quantized: the process's own memory now
    rss.append(int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024)
if sys.argv[2] == "memory":
    QuantizedExperts.quantize(ck, progress=progress)
else:
    write_draft(Path(sys.argv[3]), ck, quantized_experts(ck, progress=progress), "nf4", 64, ck.config.dtype)
print(max(rss) - rss[0])  # the reader's buffer, the imports and the first expert's work are in rss[0]
"""


def test_quantize_streams_the_draft_to_its_file_holding_one_expert(tmp_path):
    """`moespeq quantize` held the whole draft in memory, then wrote it (about 25 GB of
    4-bit experts for Mixtral: more than many hosts hold). It streams now: past the first
    expert the process grows by a few MiB, where quantizing into memory grows by the
    draft; the file is the same draft (test_save_load_roundtrip_and_cli)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_checkpoint.py"
    ckpt, out = tmp_path / "many", tmp_path / "draft"
    args = ["--hidden", "256", "--intermediate", "768", "--layers", "2", "--experts", "64", "--dtype", "bfloat16"]
    subprocess.run([sys.executable, str(script), str(ckpt), *args], check=True, capture_output=True, timeout=300)

    def growth(*how):
        run = [sys.executable, "-c", QUANTIZE_GROWTH, str(ckpt), *how]
        return int(subprocess.run(run, capture_output=True, text=True, check=True, timeout=300).stdout)

    streamed = growth("file", str(out))
    draft = (out / "draft.safetensors").stat().st_size
    assert draft > 40 * 2**20
    assert streamed < 0.25 * draft, (streamed / 2**20, draft / 2**20)
    held = growth("memory")  # the measure sees a held draft
    assert held > 0.75 * draft, (held / 2**20, draft / 2**20)


def test_the_draft_file_is_safetensors_and_every_expert_in_its_place(tiny, tmp_path):
    """The streamed file against the tensors it was given: read back by safetensors
    itself, each name, dtype, shape and value; an expert out of order or of another
    layout is refused, not written where another belongs."""
    from safetensors import safe_open

    from moespeq_cli.quant.draft import PROJ, write_draft
    from moespeq_cli.quant.draft_file import expert_tensors

    for family, variant in (("mixtral", "top3"), ("gpt_oss", "alternating")):
        ck = Checkpoint(tiny(family, variant)[0])
        q = QuantizedExperts.quantize(ck)
        out = q.save(tmp_path / family, ck)
        with safe_open(str(out / "draft.safetensors"), framework="pt") as f:
            names = set(f.keys())
            want = {}
            for key, parts in q.q.items():
                want.update(expert_tensors(key, parts, q.bias.get(key), PROJ))
            assert names == set(want)
            for name, t in want.items():
                got = f.get_tensor(name)
                assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
            assert f.metadata() == {"format": "moespeq-draft"}
        swapped = list(q.q.items())
        swapped[0], swapped[1] = swapped[1], swapped[0]
        with pytest.raises(RuntimeError, match="was laid out"):
            write_draft(tmp_path / "x", ck, ((k, p, q.bias.get(k)) for k, p in swapped), "nf4", 64, ck.config.dtype)
        assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_every_expert_in_ram_is_read_past_the_page_cache(tiny, monkeypatch):
    """The all-in-RAM store read each expert through the checkpoint's memory map, whose
    pages then stayed mapped for the whole run: a second copy of the experts in the
    process (RssFile 856 MiB beside 842 MiB of experts). It reads as the disk tier does;
    the bytes are the checkpoint's."""
    from moespeq_cli.runtime.tiers.store import ExpertStore

    for family, variant in (("mixtral", "gqa"), ("qwen2_moe", "shared"), ("gpt_oss", "alternating")):
        path, _ = tiny(family, variant)
        ckpt = Checkpoint(path)
        expected = [[ckpt.expert(layer, e) for e in range(ckpt.config.num_experts)] for layer in ckpt.config.moe_layers]
        with monkeypatch.context() as m:
            m.setattr(Checkpoint, "expert", lambda *a, **k: pytest.fail("read through the memory map"))
            store = ExpertStore(Checkpoint(path), ckpt.config.dtype)
        for layer, parts in zip(ckpt.config.moe_layers, expected, strict=True):
            for e, want in enumerate(parts):
                got = store.views(store.buffer(layer, e))
                assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), (family, layer, e)


def test_the_draft_holds_what_the_plan_counts_for_a_bf16_model_with_biases(tiny, tmp_path):
    """gpt-oss in bf16 on the mock (float32 numerics): the draft held its experts' biases
    in float32 where the plan counts them as stored, and a run at a --vram `plan` said fits
    ran out of device memory. They are held as stored and widened at use."""
    from tiny_models import edited_copy

    from moespeq_cli.runtime.planning.planner import draft_bytes_estimate

    src, _ = tiny("gpt_oss", "alternating")

    def to_bf16(t):
        for k, v in t.items():
            if v.is_floating_point():
                t[k] = v.to(torch.bfloat16)

    def say_bf16(cfg):
        cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"

    path = edited_copy(src, tmp_path / "bf16", config=say_bf16, tensors=to_bf16)
    ck = Checkpoint(path)
    assert ck.config.dtype == torch.bfloat16 and ck.config.expert_format.biased
    q = QuantizedExperts.quantize(ck, dtype=torch.float32)
    assert q.total_bytes == draft_bytes_estimate(ck.config)
    x = torch.randn(3, ck.config.hidden_size)
    layer = ck.config.moe_layers[0]
    out = q.forward_reference(layer, 1, x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    saved = q.save(tmp_path / "draft", ck)
    assert QuantizedExperts.load(saved, ck, torch.float32).total_bytes == q.total_bytes


def test_experts_the_disk_tier_cannot_read_are_read_and_checked_as_before(tiny, tmp_path):
    """The all-in-RAM store reads what the disk tier refuses through the checkpoint, with
    its checks: FP8 experts without their scales stay refused (the review found them
    decoded as raw e4m3 values), and the store's dtype is what it holds (bf16 read into
    float32)."""
    from tiny_models import edited_copy

    from moespeq_cli.errors import CheckpointError
    from moespeq_cli.runtime.tiers.store import ExpertStore

    src, _ = tiny("mixtral", "gqa")

    def fp8(t):
        for k in list(t):
            if ".experts." in k:
                t[k] = t[k].to(torch.float8_e4m3fn)

    bad = edited_copy(src, tmp_path / "fp8", tensors=fp8)
    with pytest.raises(CheckpointError):
        ExpertStore(Checkpoint(bad), torch.float32)

    def bf16(t):
        for k in list(t):
            t[k] = t[k].to(torch.bfloat16)

    half = edited_copy(src, tmp_path / "bf16", config=lambda c: c.update(torch_dtype="bfloat16"), tensors=bf16)
    ck = Checkpoint(half)
    store = ExpertStore(ck, torch.float32)
    layer = ck.config.moe_layers[0]
    got = store.views(store.buffer(layer, 2))
    assert all(g.dtype == torch.float32 for g in got)
    assert all(torch.equal(g, w.float()) for g, w in zip(got, ck.expert(layer, 2), strict=True))


def test_a_draft_with_half_precision_scales_loads_with_float32_ones(tiny, cli, tmp_path):
    """bitsandbytes' CUDA 4-bit kernels and moespeq's CPU kernels take float32 absmax only;
    a draft saved with float16 scales (by another tool) is widened at load, exactly: it
    drafts as the same draft with those values in float32."""
    from safetensors.torch import load_file, save_file

    src, _ = tiny("mixtral", "gqa")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    assert cli("quantize", str(path)).exit_code == 0
    draft = default_draft_dir(path, "nf4", 64)
    tensors = load_file(draft / "draft.safetensors")
    half = {k: v.half() if k.endswith(".absmax") else v for k, v in tensors.items()}
    widened = tmp_path / "widened"
    shutil.copytree(draft, widened)
    save_file({k: v.float() if k.endswith(".absmax") else v for k, v in half.items()}, widened / "draft.safetensors")
    save_file(half, draft / "draft.safetensors")
    ck = Checkpoint(path)
    a, b = QuantizedExperts.load(draft, ck), QuantizedExperts.load(widened, ck)
    assert all(s.absmax.dtype in (torch.float32, torch.bfloat16) for parts in a.q.values() for _, s in parts)
    x = torch.randn(3, ck.config.hidden_size)
    for layer in ck.config.moe_layers:
        assert torch.equal(a.forward(layer, 1, x), b.forward(layer, 1, x))


def test_a_draft_cut_short_is_damaged_not_ready(tiny, cli, tmp_path):
    """`list` showed a draft whose tensors' file was cut to 1,000 bytes as ready; `run`
    then stopped on it. Its state is "damaged" (rebuild it), from the header and size."""
    from moespeq_cli.quant.draft_store import draft_state

    src, _ = tiny("mixtral", "gqa")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    assert cli("quantize", str(path)).exit_code == 0
    draft = default_draft_dir(path, "nf4", 64)
    assert draft_state(draft, Checkpoint(path)) == "ready"
    f = draft / "draft.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    assert draft_state(draft, Checkpoint(path)) == "damaged"


def test_quantize_again_leaves_an_up_to_date_draft_alone(tiny, cli, tmp_path):
    """A second `quantize` of the same weights, method and block size does nothing and says
    so (a large model's took minutes for the same bytes); --force quantizes again; other
    weights or another block size are quantized; the draft's path is absolute."""
    import os
    from pathlib import Path

    src, _ = tiny("mixtral", "gqa")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    first = json.loads(cli("quantize", str(path), "--json").stdout)
    draft = Path(first["draft"])
    assert draft.is_absolute() and not first["up_to_date"]
    stamp = os.stat(draft / "draft.safetensors").st_mtime_ns
    os.utime(draft / "manifest.json", ns=(0, 0))
    r = cli("quantize", str(path))
    assert r.exit_code == 0 and "up to date" in r.stderr and r.stdout.strip() == str(draft), r.stderr
    again = json.loads(cli("quantize", str(path), "--json").stdout)
    assert again == first | {"up_to_date": True, "seconds": 0.0}
    assert os.stat(draft / "draft.safetensors").st_mtime_ns == stamp  # not written again
    # but its manifest touched: `run --draft auto` takes the draft quantize saved last, by that time
    assert os.stat(draft / "manifest.json").st_mtime_ns > 0
    forced = json.loads(cli("quantize", str(path), "--force", "--json").stdout)
    assert not forced["up_to_date"] and os.stat(draft / "draft.safetensors").st_mtime_ns != stamp
    other = json.loads(cli("quantize", str(path), "--blocksize", "128", "--json").stdout)
    assert not other["up_to_date"] and Path(other["draft"]) != draft
    cfg = json.loads((path / "config.json").read_text())  # other weights: the fingerprint differs
    (path / "config.json").write_text(json.dumps(cfg | {"rms_norm_eps": 1e-5}))
    assert not json.loads(cli("quantize", str(path), "--json").stdout)["up_to_date"]
    out = tmp_path / "mine"
    assert cli("quantize", str(path), "--out", str(out)).exit_code == 0
    link = tmp_path / "link"
    link.symlink_to(out)
    for given in (out, link, tmp_path / "sub" / ".." / "mine"):  # the same draft whatever the spelling
        (tmp_path / "sub").mkdir(exist_ok=True)
        r = cli("quantize", str(path), "--out", str(given), "--json")
        assert json.loads(r.stdout)["up_to_date"] and json.loads(r.stdout)["draft"] == str(out), given
    r = cli("quantize", str(path), "--out", str(out))
    assert "up to date" in r.stderr and f"--draft {out}` uses it" in r.stderr  # how to use it, as after quantizing
