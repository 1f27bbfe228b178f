"""Host syncs on the GPU path's code: at most one per MoE layer per forward pass (the
routing reaches the host, which decides the copies) plus one per pass for the sampler,
in plain decoding, with gate-prefetch, and in speculative decoding (draft passes and
verification). Counted where the code makes them, on the CPU (``HostSyncCounter`` for
``tolist`` and host-to-device tensors from lists, the dispatcher for ``item``)."""

import pytest
import torch
from offload_helpers import GROUPED_GPU, prompt_for, vram_for_slots

from moespeq_cli.runtime.engine import Engine, EngineOptions
from moespeq_cli.runtime.executors.opcount import HostSyncCounter, OpCounter
from moespeq_cli.runtime.sampling import SamplingParams


def syncs_per_pass(path, policy: str, depth="auto", tokens: int = 6, hardware="rtx3060-12gb"):
    """(host syncs per forward pass, MoE layers, syncs by kind) decoding on the mock."""
    eng = Engine(path, EngineOptions(backend="mock", hardware=hardware, policy=policy, spec_depth=depth))
    prompt = prompt_for(11, 6)
    eng.load(len(prompt) + tokens + 8)
    passes = [0]
    try:
        stream = eng.generate(prompt, tokens + 1, SamplingParams())
        next(stream)  # the prompt
        hook = eng.model.register_forward_pre_hook(lambda *a: passes.__setitem__(0, passes[0] + 1))
        with torch.inference_mode(), OpCounter(skip_casts=True) as ops, HostSyncCounter() as host:
            for _ in stream:
                pass
        hook.remove()
    finally:
        eng.close()
    kinds = {"item": ops.syncs, **host.by_kind}
    return sum(kinds.values()) / passes[0], len(eng.ckpt.config.moe_layers), kinds


@pytest.mark.parametrize("family,variant", [("mixtral", "gqa"), ("qwen3_moe", "base")])
@pytest.mark.parametrize("policy,depth", [("lru", "auto"), ("gate-prefetch", "auto"), ("moespeq", "3")])
@pytest.mark.parametrize("hardware", ["rtx3060-12gb", GROUPED_GPU])  # expert by expert, grouped
def test_one_sync_per_moe_layer_per_pass(tiny, family, variant, policy, depth, hardware):
    path, _ = tiny(family, variant)
    per_pass, moe_layers, kinds = syncs_per_pass(path, policy, depth, hardware=hardware)
    assert per_pass <= moe_layers + 1, kinds
    assert kinds["tensor"] == 0, kinds  # no index tensor built from a host list per expert
    assert kinds["list_index"] == 0, kinds


@pytest.mark.parametrize("policy,depth", [("hybrid", "auto"), ("moespeq", "3")])
def test_cpu_experts_take_their_rows_without_a_sync(tiny, policy, depth):
    """An expert computed on the CPU during a verification (or a prefill) takes its
    tokens' rows by an index uploaded without a wait; ``x[rows]`` copied the list from
    pageable memory, a wait for the compute stream on a GPU, one per CPU expert."""
    path, _ = tiny("mixtral", "wide")
    vram = vram_for_slots(path, 6, 40, policy=policy)
    eng = Engine(path, EngineOptions(backend="mock", policy=policy, spec_depth=depth, vram=vram))
    prompt = prompt_for(11, 6)
    eng.load(len(prompt) + 16)
    try:
        with torch.inference_mode(), HostSyncCounter() as host:
            n = len(list(eng.generate(prompt, 12, SamplingParams())))
        assert n == 12 and eng.target_exec.cache.stats.host_computed > 0
    finally:
        eng.close()
    assert host.by_kind["list_index"] == 0, host.by_kind


def test_the_counter_sees_host_reads():
    x = torch.arange(6).view(2, 3)
    with HostSyncCounter() as c:
        x.tolist()
        torch.tensor([1, 2], device=x.device)
        torch.tensor([1, 2])  # host to host: no device involved
        x[[0, 1]]
        x[1:, [0, 2]]
        x[0, 1:]  # no list: not counted
    assert c.by_kind == {"tolist": 1, "tensor": 1, "list_index": 2} and c.total == 4
    assert torch.Tensor.tolist is not None and x.tolist() == [[0, 1, 2], [3, 4, 5]]  # restored


def test_the_dispatcher_counts_every_scalar_read():
    """``item()``, ``int()``/``float()`` of a tensor and ``bool()`` each wait for a GPU."""
    x = torch.randn(5)
    with torch.inference_mode(), OpCounter() as c:
        x.sum().item()
        int(x.argmax())
        float(x.max())
        bool(torch.isfinite(x).all())
    assert c.syncs == 4


@pytest.mark.parametrize("policy", ["lru", "gate-prefetch"])
def test_mxfp4_experts_make_no_sync_of_their_own(tiny, tmp_path, policy):
    """gpt-oss's MXFP4 experts dequantized on the device: their value table is made once,
    not copied to the device from a Python list for every expert (a sync each: 8 a pass
    on this checkpoint before)."""
    from tiny_models import mxfp4_copy

    src, _ = tiny("gpt_oss", "mx")
    per_pass, moe_layers, kinds = syncs_per_pass(mxfp4_copy(src, tmp_path / "mx"), policy)
    assert per_pass <= moe_layers + 1 and kinds["tensor"] == 0, kinds
