"""Experts stored another way than three matrices each (models/expert_format.py): gpt-oss's
fused, transposed, interleaved and biased tensors and Gemma 4's fused gate|up halves, read
by every tier and quantized for the draft."""

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
    """transformers' experts module (gpt-oss's, Gemma 4's) for expert ``e`` alone, with
    routing weight 1."""
    block = ref.model.layers[layer]
    experts = block.mlp.experts if hasattr(block.mlp, "experts") else block.experts
    ids = torch.full((x.shape[0], 1), e)
    with torch.no_grad():
        return experts(x, ids, torch.ones(x.shape[0], 1))


@pytest.mark.parametrize(
    "family,variant,parts", [("gpt_oss", "alternating", 4), ("gpt_oss", "clamped", 4), ("gemma4", "kv_eq", 2)]
)
def test_every_tier_reads_the_fused_experts_as_transformers_computes_them(tiny, family, variant, parts):
    path, ref = tiny(family, variant)
    ck = Checkpoint(path)
    c, fmt = ck.config, ck.config.expert_format
    assert fmt.fused and fmt.biased == (family == "gpt_oss") and len(ck.config.expert_shapes()) == parts
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
    if family == "gpt_oss":  # a lost bias would not: the reference is sensitive to it
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


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("hidden_size_per_layer_input", 256, "per-layer input embeddings"),
        ("num_kv_shared_layers", 2, "KV caches shared between layers"),
        ("use_bidirectional_attention", "all", "encoder"),
    ],
)
def test_gemma4_features_of_the_dense_models_are_refused_in_one_line(tiny, tmp_path, field, value, words):
    src, _ = tiny("gemma4", "alternating")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg[field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    from moespeq_cli.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=words) as err:
        Checkpoint(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("top_k", [0, 9])
def test_gemma4_top_k_outside_the_experts_is_refused(tiny, tmp_path, top_k):
    src, _ = tiny("gemma4", "alternating")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["top_k_experts"] = top_k
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="top_k_experts"):
        Checkpoint(path)


def test_gemma4_per_layer_config_keys_as_transformers_writes_them(tiny):
    """Zero-padded ("05", "11" of 12 layers): the global layers get their own head size."""
    path, _ = tiny("gemma4", "twelve")
    cfg = json.loads((path / "config.json").read_text())
    assert set(cfg["per_layer_config"]) == {"05", "11"}
    from moespeq_cli.models.loader import load_model

    model = load_model(Checkpoint(path), torch.float32)  # shapes checked against the file
    assert model.model.layers[5].self_attn.s.head_dim == 16 and model.model.layers[4].self_attn.s.head_dim == 8
