"""Engine: one loaded model ready to generate -- checkpoint, model, tokenizer and the
expert executor of the chosen backend. The CLI, the benchmark and the tests use it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moespeq_cli.errors import UsageError
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.models.config import DTYPES
from moespeq_cli.runtime.experts import InMemoryExperts
from moespeq_cli.runtime.generate import TokenEvent, generate
from moespeq_cli.runtime.loader import load_model
from moespeq_cli.runtime.sampling import SamplingParams
from moespeq_cli.runtime.stats import GenerationStats
from moespeq_cli.tokenizer import Tokenizer

BACKENDS = ("auto", "cpu")


@dataclass
class EngineOptions:
    backend: str = "auto"
    dtype: str | None = None  # None: the checkpoint's torch_dtype
    context: int = 0  # longest sequence expected (prompt + new tokens); 0 = unknown
    cpu_threads: int | None = None


class Engine:
    def __init__(self, path: Path, opts: EngineOptions | None = None):
        opts = opts or EngineOptions()
        if opts.backend not in BACKENDS:
            raise UsageError(f"unknown backend {opts.backend!r}; choose one of {', '.join(BACKENDS)}")
        if opts.dtype is not None and opts.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {opts.dtype!r}; choose float32, float16 or bfloat16")
        if opts.cpu_threads:
            torch.set_num_threads(opts.cpu_threads)
        self.backend = "cpu"
        self.ckpt = Checkpoint(path)
        self.tokenizer = Tokenizer(self.ckpt.path, self.ckpt.raw_config)
        self.dtype = DTYPES[opts.dtype] if opts.dtype else self.ckpt.config.dtype
        self.model = load_model(self.ckpt, self.dtype, opts.context)
        self.model.set_experts(InMemoryExperts(self.ckpt, self.dtype))
        self.clock_kind = "wall"
        self.last_stats: GenerationStats | None = None

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams) -> Iterator[TokenEvent]:
        times = []
        for ev in generate(self.model, prompt_ids, max_new_tokens, sampling, self.tokenizer.eos_ids, time.perf_counter):
            times.append(ev.seconds)
            yield ev
        self.last_stats = GenerationStats.from_times(self.clock_kind, times)
