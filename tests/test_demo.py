"""The built-in demo model: shipped in the package, loadable by transformers with the
same greedy tokens, and `moespeq run` with no MODEL works offline."""

import json

import torch

from moespeq_cli.model_ref import DEMO_DIR

COMMON = {
    "the",
    "and",
    "of",
    "to",
    "i",
    "you",
    "my",
    "in",
    "is",
    "that",
    "a",
    "not",
    "me",
    "with",
    "it",
    "be",
    "his",
    "for",
    "your",
    "he",
    "shall",
    "have",
    "will",
    "thou",
    "lord",
    "unto",
    "what",
    "this",
    "as",
    "but",
}


def test_demo_is_shipped_small_and_in_hf_layout():
    cfg = json.loads((DEMO_DIR / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] >= 8 and cfg["num_experts_per_tok"] == 2
    total = sum(p.stat().st_size for p in DEMO_DIR.iterdir())
    assert total < 40 * 2**20
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json", "config.json"):
        assert (DEMO_DIR / name).is_file()


def test_transformers_gives_the_same_greedy_tokens():
    from transformers import MixtralForCausalLM

    from moespeq_cli.cli.run import DEMO_PROMPT
    from moespeq_cli.runtime.engine import Engine, EngineOptions
    from moespeq_cli.runtime.sampling import SamplingParams

    eng = Engine(DEMO_DIR, EngineOptions(backend="cpu", dtype="float32"))
    ids = eng.tokenizer.encode(DEMO_PROMPT)
    eng.load(len(ids) + 32)
    ours = [ev.token for ev in eng.generate(ids, 32, SamplingParams())]
    ref = MixtralForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([ids]),
            max_new_tokens=32,
            do_sample=False,
            pad_token_id=0,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    theirs = out[0, len(ids) :].tolist()
    assert ours[: len(theirs)] == theirs


def test_run_with_no_model_reads_like_english(cli):
    r = cli("run", "-n", "48", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == "demo" and out["backend"] == "mock"
    assert out["plan"]["slots"] < out["plan"]["total_experts"]  # the default budget offloads experts
    words = [w.strip(".,;:!?'\"[]()").lower() for w in out["text"].split()]
    assert sum(w in COMMON for w in words) >= 5, out["text"]
    assert sum(c.isascii() for c in out["text"]) / len(out["text"]) > 0.95


def test_the_demo_ships_its_draft(cli, monkeypatch, tmp_path):
    """The demo's 4-bit draft comes with it (no quantization, no bitsandbytes quantizer,
    before the first token), matches the demo by fingerprint, and gives the same draft
    as quantizing afresh."""
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.quant.draft import QuantizedExperts
    from moespeq_cli.quant.draft_store import bundled_draft

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no draft saved by an earlier `moespeq quantize`
    out = json.loads(cli("run", "-n", "4", "--spec-depth", "2", "--json").stdout)  # a fixed depth keeps the draft
    assert out["draft"].endswith("demo-draft-nf4-b64")
    ck = Checkpoint(DEMO_DIR)
    shipped = QuantizedExperts.load(bundled_draft(DEMO_DIR, "nf4", 64), ck)
    fresh = QuantizedExperts.quantize(ck, "nf4", 64)
    for key in list(fresh.q)[:4]:
        for (a, sa), (b, sb) in zip(shipped.q[key], fresh.q[key], strict=True):
            assert torch.equal(a, b) and torch.equal(sa.absmax, sb.absmax)


def test_planning_the_demo_does_not_import_torch_dynamo():
    """A plan's shape-only model fuses q, k and v without torch's meta ``cat``, whose first
    call imports torch._dynamo: 1.2 s of the demo's 2.2 s to its first token."""
    import subprocess
    import sys

    code = f"""
import sys
from moespeq_cli.models import build_model
from moespeq_cli.models.base import fuse_attention_projections
from moespeq_cli.models.checkpoint import Checkpoint
ck = Checkpoint({str(DEMO_DIR)!r})
model = build_model(ck.arch, ck.raw_config, 64)
fuse_attention_projections(model)
q = model.model.layers[0].self_attn.q_proj.weight
print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo", tuple(q.shape), q.is_meta)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["no", "dynamo"] and out[-1] == "True", out
