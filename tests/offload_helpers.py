"""Helpers for offloading tests: budgets expressed as a number of expert slots."""

import re
import tempfile
from pathlib import Path

import torch

from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.runtime.engine import Engine, EngineOptions
from moespeq_cli.runtime.planning.hardware import profiles_dir
from moespeq_cli.runtime.planning.planner import checkpoint_plan
from moespeq_cli.runtime.sampling import SamplingParams


def grouped_gpu_profile() -> str:
    """The H100 profile with a grouped GEMM that takes float32 too (a real H100's takes
    bfloat16 only), written to a temporary file: the float32 tiny checkpoints then take
    the grouped path on the mock and compare bit for bit (the default profile's GPU, an
    RTX 3060, computes expert by expert)."""
    text = (profiles_dir() / "h100-pcie.yaml").read_text()
    text = re.sub(r"(?m)^name:.*$", "name: grouped-gpu-test", text)
    text = re.sub(r"(?m)^grouped_gemm:.*$", "grouped_gemm: [bfloat16, float32]", text)
    out = Path(tempfile.mkdtemp(prefix="moespeq-test-")) / "grouped-gpu.yaml"
    out.write_text(text)
    return str(out)


GROUPED_GPU = grouped_gpu_profile()


def vram_for_slots(
    path, slots: int, context: int, dtype=None, backend: str = "mock", hardware=None, policy: str = "lru"
) -> int:
    """The --vram that holds ``slots`` experts beside the fixed part, as ``backend`` plans
    it for ``policy`` (on cuda the fixed part holds cuBLAS's workspaces too; with a draft,
    linear-attention layers' rollback states; with CPU experts, by default for moespeq and
    hybrid, the expert outputs a grouped prompt holds)."""
    from moespeq_cli.runtime.backends import library_bytes
    from moespeq_cli.runtime.executors.grouped import grouped_scratch_bytes
    from moespeq_cli.runtime.planning.hardware import load_profile
    from moespeq_cli.runtime.scheduling.policies import make_policy

    hw = load_profile(hardware) if isinstance(hardware, str) else hardware
    ck = Checkpoint(path)
    scratch = grouped_scratch_bytes(hw, ck.config, dtype or ck.config.dtype, context) if hw is not None else 0
    plan = checkpoint_plan(
        ck,
        context,
        dtype=dtype,
        library_bytes=library_bytes(backend, hw),
        policy=policy,
        grouped_scratch=scratch,
        cpu_experts=backend != "cpu" and make_policy(policy, None).host_compute,
    )
    return plan.fixed_bytes + slots * plan.expert_bytes


def run_engine(path, prompt, n, backend="mock", policy="lru", slots=None, hardware=None, sampling=None):
    vram = (
        vram_for_slots(path, slots, len(prompt) + n, backend=backend, hardware=hardware, policy=policy)
        if slots is not None
        else None
    )
    # the draft is loaded where it fits and the governor decides (the plan's own verdict on
    # the draft, EngineOptions.draft_verdict, is tested in tests/test_draft_verdict.py)
    eng = Engine(path, EngineOptions(backend=backend, policy=policy, vram=vram, hardware=hardware, draft_verdict=False))
    eng.load(len(prompt) + n)
    tokens = [ev.token for ev in eng.generate(prompt, n, sampling or SamplingParams())]
    return tokens, eng


def prompt_for(seed: int, n: int = 10) -> list[int]:
    """A reproducible random prompt of n token ids."""
    return torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# One tiny checkpoint per family: the lossless checks of speculation and hybrid execution.
FAMILIES = [
    ("mixtral", "gqa"),
    ("qwen2_moe", "shared"),
    ("qwen3_moe", "base"),
    ("olmoe", "base"),
    ("phimoe", "base"),
    ("deepseek_v2", "lite"),
    ("deepseek_v3", "v3"),
    ("glm4_moe", "qknorm"),
    ("glm4_moe_lite", "sparse_all"),
    ("qwen3_next", "hybrid"),
    ("qwen3_5_moe", "text"),
    ("gpt_oss", "alternating"),
    ("gemma4", "kv_eq"),
]


def stop_generation_after(monkeypatch, n: int, error=KeyboardInterrupt) -> None:
    """``Engine.generate`` raising ``error`` once it has given ``n`` tokens: Ctrl-C, or a
    signal's ``Terminated``, arriving mid-answer."""
    generate = Engine.generate

    def stopped(self, *args, **kwargs):
        for ev in generate(self, *args, **kwargs):
            yield ev
            if ev.index == n - 1:
                raise error

    monkeypatch.setattr(Engine, "generate", stopped)
