"""LongRoPE (Phi-3.5-MoE): the short factors while the sequence is at most the original
training length, the long ones past it, and the cache recomputed where a sequence
crosses over -- so a token never depends on how long the run planned to be."""

import json
import time

import pytest
import torch
import transformers
from test_parity import ours, reference_greedy
from tiny_models import edited_copy
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from moespeq_cli.runtime.generate import generate
from moespeq_cli.runtime.sampling import SamplingParams
from moespeq_cli.runtime.speculative import SpecHooks, speculative_generate

ORIG = 24  # original_max_position_embeddings of the test's checkpoint


def longrope(cfg: dict) -> None:
    half = cfg["hidden_size"] // cfg["num_attention_heads"] // 2
    cfg.pop("rope_parameters", None)
    cfg.update(
        rope_theta=10000.0,
        max_position_embeddings=256,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [2.0 + 0.7 * i for i in range(half)],
            "short_mscale": 1.1,
            "long_mscale": 1.3,
            "original_max_position_embeddings": ORIG,
        },
    )


@pytest.fixture(scope="module")
def phi(tiny, tmp_path_factory):
    """(checkpoint, reference): a tiny Phi-3.5-MoE with LongRoPE, and transformers' Phimoe
    rotating as Phi-3's reference code does. transformers' Phimoe recomputes its
    frequencies in every forward without the sequence length, so it never takes the long
    factors (its Phi3 does, as Microsoft's code): the reference's rotary is Phi-3's."""
    src, _ = tiny("phimoe", "base")
    path = edited_copy(src, tmp_path_factory.mktemp("longrope") / "ckpt", config=longrope)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rope = ref.config.rope_parameters

    def forward(x, position_ids):
        length = int(position_ids.max()) + 1
        inv, _ = ROPE_INIT_FUNCTIONS["longrope"](ref.config, x.device, seq_len=length)
        scale = rope["long_mscale" if length > ORIG else "short_mscale"]
        freqs = position_ids[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)

    ref.model.rotary_emb.forward = forward
    return path, ref


@pytest.mark.parametrize("length", [ORIG - 4, ORIG, ORIG + 16])
def test_logits_match_the_reference_either_side(phi, length):
    path, ref = phi
    ids = torch.randint(3, 200, (length,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    model = ours(path)
    got = model(ids, model.new_cache())
    assert float((got - expected).norm() / expected.norm()) < 1e-4


def test_greedy_decoding_across_the_switch_matches_the_reference(phi):
    """Decoding from 16 tokens to 48: the pass that reaches position 24 recomputes the
    cache with the long factors, as the reference's generate does."""
    path, ref = phi
    prompt = torch.randint(3, 200, (16,), generator=torch.Generator().manual_seed(4)).tolist()
    got = [ev.token for ev in generate(ours(path), prompt, 32, SamplingParams())]
    assert got == reference_greedy(ref, prompt, 32)


def run_tokens(cli, path, *args):
    r = cli("run", str(path), "-p", "abcdefghij" * 2, "--no-chat", "--json", *args)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)["token_ids"]


@pytest.mark.parametrize("backend", ["cpu", "mock"])
def test_tokens_do_not_depend_on_the_planned_context(phi, cli, backend):
    """The first tokens of a run are the same however many follow, and (on the mock, which
    quantizes a draft for the run) with speculation, whose passes stop at the switch: the
    target recomputes the cache."""
    path, _ = phi
    longest = run_tokens(cli, path, "-n", "24", "--backend", backend, "--spec-depth", "0")
    assert run_tokens(cli, path, "-n", "3", "--backend", backend) == longest[:3]
    assert run_tokens(cli, path, "-n", "3", "--context", "200", "--backend", backend) == longest[:3]
    if backend == "mock":
        assert run_tokens(cli, path, "-n", "24", "--backend", backend, "--spec-depth", "4") == longest


def test_a_cache_cut_back_below_the_switch_is_recomputed(phi):
    """A conversation's cache reused after an edit (chat, serve) may be cut back below the
    switch: the next pass takes the short tables again, for every position."""
    path, _ = phi
    model = ours(path)
    ids = torch.randint(3, 200, (32,), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache()
    model(ids[:30], cache)  # past the switch: the long tables
    cache.truncate(20)
    got = model(ids[20:22], cache)  # ends at 22, within the original length
    fresh = model(ids[:22], model.new_cache())[20:]
    assert torch.allclose(got, fresh, atol=1e-5, rtol=1e-5)


def test_the_recomputing_cycle_is_flagged_to_the_hooks(phi):
    """The pass that re-encodes the sequence is no decoding cycle: the hooks are told, so
    the governor does not learn a cycle's time from it (runtime/scheduling/elb.py)."""
    path, _ = phi
    model = ours(path)
    experts = next(iter(model.moe_blocks.values())).experts
    flags = []

    class Hooks(SpecHooks):
        def end_cycle(self, k, accepted, recomputed=False):
            flags.append(recomputed)

    prompt = torch.randint(3, 200, (16,), generator=torch.Generator().manual_seed(6)).tolist()
    tokens = speculative_generate(
        model, experts, None, prompt, 16, SamplingParams(), set(), time.perf_counter, lambda: 0, Hooks()
    )
    assert len(list(tokens)) == 16
    assert flags.count(True) == 1 and flags.index(True) == ORIG - 16  # the pass at position 24
