"""Experts stored another way than three matrices each (models/expert_format.py): gpt-oss's
fused, transposed, interleaved and biased tensors, read by every tier and quantized for
the draft."""

import json
import shutil

import pytest
import torch

from moespeq_cli.errors import CheckpointError
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.quant.draft import QuantizedExperts
from moespeq_cli.runtime.executors.experts import expert_forward
from moespeq_cli.runtime.tiers.disk import DiskExperts, DiskReader
from moespeq_cli.runtime.tiers.store import ExpertStore


def reference_expert(ref, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
    """transformers' GptOssExperts for expert ``e`` alone, with routing weight 1."""
    experts = ref.model.layers[layer].mlp.experts
    ids = torch.full((x.shape[0], 1), e)
    with torch.no_grad():
        return experts(x, ids, torch.ones(x.shape[0], 1))


@pytest.mark.parametrize("variant", ["alternating", "clamped"])
def test_every_tier_reads_the_fused_experts_as_transformers_computes_them(tiny, variant):
    path, ref = tiny("gpt_oss", variant)
    ck = Checkpoint(path)
    c, fmt = ck.config, ck.config.expert_format
    assert fmt.fused and fmt.biased and len(ck.config.expert_shapes()) == 4
    store, disk = ExpertStore(ck, torch.float32), DiskExperts(ck)
    buf = disk.empty_buffer()
    x = torch.randn(3, c.hidden_size, generator=torch.Generator().manual_seed(1))
    with DiskReader(threads=1) as reader:
        for layer, e in [(0, 0), (c.num_layers - 1, c.num_experts - 1), (1, 3)]:
            parts = ck.expert(layer, e)
            assert [tuple(p.shape) for p in parts] == list(c.expert_shapes())
            disk.read((layer, e), buf, reader)
            for a, b, d in zip(parts, store.views(store.buffer(layer, e)), disk.views(buf), strict=True):
                assert torch.equal(a, b) and torch.equal(a, d)
            want = reference_expert(ref, layer, e, x)
            got = expert_forward(fmt, x, parts)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            # the canonical matrices the draft quantizes compute the same expert
            torch.testing.assert_close(fmt.forward_canonical(x, *fmt.canonical(parts)), want, rtol=1e-5, atol=1e-6)
    # a wrong clamp or a lost bias would not: the reference is sensitive to both
    parts = ck.expert(0, 1)
    unbiased = (parts[0], torch.zeros_like(parts[1]), parts[2], parts[3])
    assert not torch.allclose(expert_forward(fmt, x, unbiased), reference_expert(ref, 0, 1, x), atol=1e-4)


def test_the_draft_quantizes_gpt_oss_experts_with_their_biases(tiny, tmp_path):
    src, _ = tiny("gpt_oss", "alternating")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    ck = Checkpoint(path)
    fmt = ck.config.expert_format
    q = QuantizedExperts.quantize(ck)
    assert set(q.bias) == set(q.q)
    x = torch.randn(4, ck.config.hidden_size, generator=torch.Generator().manual_seed(2))
    for key in [(0, 0), (2, 5)]:
        parts = ck.expert(*key)
        # the biases are kept as they are, de-interleaved like the matrices
        for kept, real in zip(q.bias[key], fmt.canonical(parts)[3], strict=True):
            assert torch.equal(kept, real)
        full = expert_forward(fmt, x, parts)
        err = float((q.forward(*key, x) - full).norm() / full.norm())
        assert err < 0.6  # 4-bit weights of these tiny random experts: median 0.38, as Mixtral's
        # the draft's kernel path is its dequantize-then-matmul reference, biases included
        reference = fmt.forward_canonical(x, *q.weights(*key), q.bias[key])
        assert torch.equal(q.forward_reference(*key, x), reference)
        torch.testing.assert_close(q.forward(*key, x), reference)
    # saved and loaded with its biases
    draft = q.save(tmp_path / "draft", ck)
    loaded = QuantizedExperts.load(draft, ck)
    assert torch.equal(loaded.forward(1, 2, x), q.forward(1, 2, x))
    # a draft without a bias is refused, not run without it
    from safetensors.torch import load_file, save_file

    tensors = load_file(draft / "draft.safetensors")
    del tensors["layers.1.experts.2.up.bias"]
    save_file(tensors, draft / "draft.safetensors", metadata={"format": "moespeq-draft"})
    with pytest.raises(CheckpointError, match="up.bias"):
        QuantizedExperts.load(draft, ck)


def test_a_fused_tensor_of_the_wrong_shape_is_refused(tiny, tmp_path):
    src, _ = tiny("gpt_oss", "clamped")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] += 2
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gate_up_proj has shape"):
        ExpertStore(Checkpoint(path), torch.float32)
