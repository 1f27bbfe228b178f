"""Quantized routed experts for the self-draft (MoE-SpeQ's draft model).

Only the routed experts are quantized (bitsandbytes NF4 or FP4, blockwise absmax);
everything else the draft runs -- embeddings, attention, norms, routers, shared experts,
LM head, and the KV cache -- is the target's own, shared at run time, never copied.

Compute path: ``dequantize_4bit`` then a dense matmul, one expert at a time. It is the
one 4-bit path moespeq uses, correct on CPU and GPU alike (bitsandbytes' ``gemv_4bit``
on the standard layout silently returns wrong values on CPU); tests compare it with an
independent dequantize-then-matmul and bound its error against full precision.

On disk (``moespeq quantize``): ``draft.safetensors`` (packed weights plus each
QuantState's tensors) and ``manifest.json`` (method, blocksize, source fingerprint,
moespeq version), written into a temporary directory and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from moespeq_cli import __version__
from moespeq_cli.errors import CheckpointError, UsageError
from moespeq_cli.models.checkpoint import Checkpoint, read_json
from moespeq_cli.runtime.experts import expert_mlp

METHODS = ("nf4", "fp4")
PROJ = ("gate", "up", "down")
FORMAT = "moespeq-draft"
FORMAT_VERSION = 1


def _bnb():
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as F

    return F


def check_method(method: str, blocksize: int) -> None:
    if method not in METHODS:
        raise UsageError(f"unknown quantization method {method!r}; choose nf4 or fp4")
    if blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
        raise UsageError(f"--blocksize {blocksize} is not supported; use a power of two from 64 to 4096")


def fingerprint(ckpt: Checkpoint) -> str:
    """A cheap identity of the source weights: config.json, each safetensors header, and
    16 samples of 4 KiB spread over each file (hashing 90 GB whole would take minutes)."""
    h = hashlib.sha256((ckpt.path / "config.json").read_bytes())
    for name in sorted(ckpt._files):
        p = ckpt.path / name
        size = p.stat().st_size
        h.update(f"{name}:{size}".encode())
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(n))
            for i in range(16):
                f.seek(8 + n + (size - 8 - n) * i // 16)
                h.update(f.read(4096))
    return h.hexdigest()


class QuantizedExperts:
    """4-bit copies of every routed expert: ``q[(layer, expert)] = [(packed, state)] * 3``."""

    def __init__(self, q: dict, method: str, blocksize: int, dtype: torch.dtype, hidden: int, inter: int):
        self.q, self.method, self.blocksize, self.dtype = q, method, blocksize, dtype
        self.hidden, self.inter = hidden, inter

    @classmethod
    def quantize(
        cls,
        ckpt: Checkpoint,
        method: str = "nf4",
        blocksize: int = 64,
        dtype: torch.dtype | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> QuantizedExperts:
        check_method(method, blocksize)
        F = _bnb()
        c = ckpt.config
        dtype = dtype or c.dtype
        ckpt.check_experts()
        q = {}
        total, done = len(c.moe_layers) * c.num_experts, 0
        for layer in c.moe_layers:
            for e in range(c.num_experts):
                parts = []
                for w in ckpt.expert(layer, e, dtype):
                    packed, state = F.quantize_4bit(w.contiguous(), blocksize=blocksize, quant_type=method)
                    parts.append((packed, state))
                q[(layer, e)] = parts
                done += 1
                if progress:
                    progress(done, total)
        return cls(q, method, blocksize, dtype, c.hidden_size, c.expert_intermediate)

    def weights(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        F = _bnb()
        return tuple(F.dequantize_4bit(p, s).to(self.dtype) for p, s in self.q[(layer, expert)])  # type: ignore[return-value]

    def forward(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        return expert_mlp(x, *self.weights(layer, expert))

    @property
    def bytes_per_expert(self) -> int:
        p = next(iter(self.q.values()))
        return sum(t.numel() * t.element_size() + s.absmax.numel() * s.absmax.element_size() for t, s in p)

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_expert * len(self.q)

    def to(self, device: torch.device, keys=None) -> QuantizedExperts:
        """Move the experts in ``keys`` (default: all) to ``device``; the rest stay put."""
        for key, parts in self.q.items():
            if keys is not None and key not in keys:
                continue
            moved = []
            for packed, state in parts:
                state.to(device)
                moved.append((packed.to(device), state))
            self.q[key] = moved
        return self

    def zero_(self) -> QuantizedExperts:
        """A deliberately broken draft (all expert outputs zero): for tests."""
        for parts in self.q.values():
            for _packed, state in parts:
                state.absmax.zero_()
        return self

    # -- on disk ----------------------------------------------------------------
    def save(self, out: Path, source: Checkpoint) -> Path:
        from safetensors.torch import save_file

        out = Path(out)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            tensors = {}
            for (layer, e), parts in self.q.items():
                for proj, (packed, state) in zip(PROJ, parts, strict=True):
                    prefix = f"layers.{layer}.experts.{e}.{proj}"
                    tensors[f"{prefix}.qweight"] = packed.contiguous()
                    for k, v in state.as_dict(packed=True).items():
                        tensors[f"{prefix}.{k}"] = v.contiguous()
            save_file(tensors, tmp / "draft.safetensors", metadata={"format": FORMAT})
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "moespeq_version": __version__,
                "method": self.method,
                "blocksize": self.blocksize,
                "dtype": str(self.dtype).split(".")[-1],
                "model_type": source.config.model_type,
                "source_fingerprint": fingerprint(source),
                "experts": len(self.q),
                "bytes": self.total_bytes,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    @classmethod
    def load(cls, path: Path, source: Checkpoint, dtype: torch.dtype | None = None) -> QuantizedExperts:
        from safetensors import SafetensorError, safe_open

        F = _bnb()
        path = Path(path)
        m = read_json(
            path / "manifest.json",
            "rebuild the draft with `moespeq quantize`",
            missing=f"{path} is not a moespeq draft (no manifest.json); build one with `moespeq quantize`",
        )
        if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path} is not a draft this moespeq can read; rebuild it with `moespeq quantize`")
        if m.get("source_fingerprint") != fingerprint(source):
            raise CheckpointError(
                f"the draft in {path} was built from a different checkpoint than {source.path}; "
                "rebuild it with `moespeq quantize`"
            )
        c = source.config
        dtype = dtype or c.dtype
        q = {}
        try:
            with safe_open(str(path / "draft.safetensors"), framework="pt") as f:
                keys = set(f.keys())
                for layer in c.moe_layers:
                    for e in range(c.num_experts):
                        parts = []
                        for proj in PROJ:
                            prefix = f"layers.{layer}.experts.{e}.{proj}"
                            if f"{prefix}.qweight" not in keys:
                                raise CheckpointError(
                                    f"the draft in {path} lacks {prefix}; rebuild it with `moespeq quantize`"
                                )
                            sd = {k[len(prefix) + 1 :]: f.get_tensor(k) for k in keys if k.startswith(prefix + ".")}
                            packed = sd.pop("qweight")
                            parts.append((packed, F.QuantState.from_dict(sd, device=torch.device("cpu"))))
                        q[(layer, e)] = parts
        except SafetensorError as err:
            raise CheckpointError(
                f"{path / 'draft.safetensors'} is truncated or corrupt ({err}); rebuild the draft"
            ) from None
        return cls(q, m["method"], m["blocksize"], dtype, c.hidden_size, c.expert_intermediate)


def default_draft_dir(ckpt_path: Path, method: str, blocksize: int) -> Path:
    """Beside the checkpoint (<dir>.moespeq-draft-nf4-b64) when its parent is writable and
    it is not the demo model inside the installed package; otherwise in moespeq's cache
    ($XDG_CACHE_HOME/moespeq/drafts, default ~/.cache/moespeq/drafts)."""
    p = Path(ckpt_path).resolve()
    name = f"{p.name}.moespeq-draft-{method}-b{blocksize}"
    package = Path(__file__).resolve().parents[1]
    if os.access(p.parent, os.W_OK) and package not in p.parents:
        return p.with_name(name)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moespeq" / "drafts"
    return cache / f"{hashlib.sha256(str(p).encode()).hexdigest()[:10]}-{name}"
