"""A long prompt taken a part at a time (models/base.py ``PREFILL_PART``): what it holds at
once against what the planner reserves for it. (Its logits against the reference's:
tests/test_parity.py ``test_a_prompt_taken_in_parts_matches_reference``.)"""

import pytest
import tiny_models
import torch
from live_bytes import LiveBytes
from offload_helpers import GROUPED_GPU, prompt_for

from moespeq_cli.models import base
from moespeq_cli.runtime.engine import Engine, EngineOptions

# Each family's tiny variant with a hidden size (288) far above its heads' count: as in a real
# model, the pass's activations (a few times ``tokens x hidden``), not attention's tiles of
# scores (``heads x 65 x keys``), are most of the workspace; the planner's count of them is
# what these tests can fail on.
WIDE = [
    ("mixtral", "gqa"),
    ("qwen2_moe", "shared"),
    ("qwen3_moe", "top8"),
    ("deepseek_v3", "v3"),
    ("qwen3_next", "hybrid"),
    ("gpt_oss", "alternating"),
    ("gemma4", "alternating"),
]


@pytest.mark.parametrize("hardware", [None, GROUPED_GPU], ids=["by-expert", "grouped"])
@pytest.mark.parametrize("family,variant", WIDE)
def test_a_long_prompt_stays_within_the_planned_workspace(tmp_path, monkeypatch, family, variant, hardware):
    monkeypatch.setattr(base, "PREFILL_PART", 32, raising=False)  # 400 tokens: 13 parts
    monkeypatch.setitem(
        tiny_models.CONFIGS[family], "activations", {**tiny_models.CONFIGS[family][variant], "hidden_size": 288}
    )
    tiny_models.build(family, "activations", tmp_path)
    prompt = prompt_for(4, 400)
    eng = Engine(tmp_path, EngineOptions(backend="mock", hardware=hardware, policy="lru", draft_verdict=False))
    eng.load(len(prompt) + 2)
    try:
        with torch.inference_mode(), LiveBytes() as seen:
            eng.model(torch.tensor(prompt), eng.model.new_cache(), last_only=True)
        plan = eng.plan
        print(
            family,
            seen.peak,
            plan.workspace_bytes,
            plan.kv_cache_bytes,
            seen.peak / (plan.workspace_bytes + plan.kv_cache_bytes),
        )
        assert seen.peak <= plan.workspace_bytes + plan.kv_cache_bytes, (seen.peak, plan)
    finally:
        eng.close()


@pytest.mark.parametrize("family,variant", [("qwen3_next", "hybrid"), ("qwen3_5_moe", "text")])
def test_a_linear_attention_prompt_stays_within_the_planned_workspace(tmp_path, monkeypatch, family, variant):
    """Linear attention's heads at a real model's proportions (keys as wide as the hidden
    size, values twice: Qwen3-Next, Qwen3.5) and a prompt in one part: its layer held every
    intermediate (the convolution's input and output, the float copies of q, k and v) until
    it returned, and the gated norm's float copies of the whole prompt on top (1.05x the
    plan on Qwen3.5's proportions); each is let go once the next is made."""
    linear = {"hidden_size": 288, "linear_key_head_dim": 144, "linear_value_head_dim": 144}
    monkeypatch.setitem(tiny_models.CONFIGS[family], "activations", {**tiny_models.CONFIGS[family][variant], **linear})
    tiny_models.build(family, "activations", tmp_path)
    prompt = prompt_for(4, 400)
    eng = Engine(tmp_path, EngineOptions(backend="mock", policy="lru", draft_verdict=False))
    eng.load(len(prompt) + 2)
    try:
        with torch.inference_mode(), LiveBytes() as seen:
            eng.model(torch.tensor(prompt), eng.model.new_cache(), last_only=True)
        assert seen.peak <= eng.plan.workspace_bytes + eng.plan.kv_cache_bytes, (seen.peak, eng.plan)
    finally:
        eng.close()


def test_a_part_s_last_state_is_kept_below_a_cycle_s_floor():
    """A linear-attention layer's state after a part is what the next part continues from:
    kept even where a speculative cycle's floor (``keep_from``) lies beyond it (a cache
    recomputed within a cycle, LongRoPE's), where it was dropped and the next part failed
    with "no recurrent state"."""
    cache = base.KVCache(1)
    cache.keep_from(100)
    cache.save_states(0, {49: ("earlier",), 50: ("part's last",)})
    cache.length = 50
    assert cache.state(0) == ("part's last",)
