"""Quantized routed experts for the self-draft (MoE-SpeQ's draft model).

Only the routed experts are quantized (bitsandbytes NF4 or FP4, blockwise absmax);
everything else the draft runs -- embeddings, attention, norms, routers, shared experts,
LM head, and the KV cache -- is the target's own, shared at run time, never copied.

Compute paths, chosen per device (docs/design.md §9: the draft must run on the kernel that
makes it cheap, and the simulator prices that kernel):

- CPU: moespeq's own 4-bit kernel (``kernels.linear_nf4``, cpu_matvec.c): it reads the
  standard layout as stored, each weight ``table[code] * absmax`` (rounded to bf16 with
  the activations where the CPU has AVX-512 BF16, as bitsandbytes' kernel does; fp32
  elsewhere), fp32 sums, batch invariant, on the same thread pool as the target's
  experts. Nothing is repacked at load, and no bitsandbytes op runs in the decode loop
  (the first call of one imports ``torch._dynamo``: 1.4-2 s on this VM, which landed in
  the first draft cycle and made the governor release the draft on the demo). It takes
  blocks of a multiple of 64 weights dividing both widths, and statistics that are not
  double-quantized (moespeq's drafts never are);
- CPU without moespeq's kernels (no C compiler): bitsandbytes' packed AVX-512 BF16
  kernel, the one ``bnb.nn.Linear4bit`` runs in eval mode: each projection is repacked
  once (``pack_cpu``) and ``gemv_4bit`` computes on the packed layout (bf16 activations,
  fp32 accumulation). bitsandbytes' ``gemv_4bit``
  on the *standard* layout silently returns wrong values on CPU, so only the packed
  layout is ever given to it. Where the CPU lacks AVX-512 BF16, or a projection's shape
  does not suit the kernel (out features not a multiple of 32, in features not a
  multiple of the block size), the expert falls back to the reference path;
- CUDA: ``bnb.matmul_4bit`` with the quantization state on the device (its GEMV kernel for
  one token);
- the reference, ``forward_reference``: ``dequantize_4bit`` then a dense matmul. Tests
  compare every fast path with it and bound its error against full precision.

On disk (``moespeq quantize``): ``draft.safetensors`` (packed weights plus each
QuantState's tensors) and ``manifest.json`` (method, blocksize, source fingerprint,
moespeq version), written into a temporary directory and renamed into place; where a
draft lives, its lock and whether it fits a checkpoint are ``quant/draft_store.py``'s.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from moespeq_cli import __version__
from moespeq_cli.errors import CheckpointError, MoespeqError, UsageError
from moespeq_cli.fs import file_status, give_back_freed_memory, is_dir, new_file_mode, shown, umask
from moespeq_cli.models.checkpoint import Checkpoint, read_json
from moespeq_cli.models.expert_format import HF_EXPERTS, ExpertFormat
from moespeq_cli.models.tensor_file import TensorFile
from moespeq_cli.quant.draft_store import (
    BLOCKSIZES,
    FORMAT,
    FORMAT_VERSION,
    METHODS,
    TMP_PREFIX,
    check_out,
    fingerprint,
    real_out,
    replace_dir,
    stem,
)

PROJ = ("gate", "up", "down")


def _bnb():
    import logging
    import sys

    # its warnings are not for users (an error is one line): bitsandbytes', and those of
    # `kernels`, which it loads its kernels through ("Skipping publisher trust check ..."
    # on every quantize with HF_HUB_OFFLINE=1)
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "bitsandbytes" not in sys.modules:
        # At import, bitsandbytes wraps a few default-backend ops (the eager dequantize and
        # optimizer-step fallbacks) in torch.compile, which imports dynamo and inductor:
        # 1.5-2.5 s before the demo's first token on a 2-core machine. moespeq's draft runs
        # bitsandbytes' packed CPU kernel or its CUDA kernels, not those ops compiled, so
        # the import sees torch.compile as the identity: bitsandbytes' own fallback when
        # compiling is unavailable.
        real = torch.compile
        torch.compile = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
        try:
            import bitsandbytes.functional  # noqa: F401
        finally:
            torch.compile = real
    import bitsandbytes.functional as F

    return F


def check_method(method: str, blocksize: int) -> None:
    if method not in METHODS:
        raise UsageError(f"unknown quantization method {method!r}; choose nf4 or fp4")
    if blocksize not in BLOCKSIZES:
        raise UsageError(f"--blocksize {blocksize} is not supported; use a power of two from 64 to 4096")


def path_bytes_per_weight(path: str, blocksize: int) -> float:
    """What a draft kernel streams per weight: the 4-bit codes and a scale per block, and
    on the reference path the dequantized bf16 weights written and read back."""
    q = 0.5 + 4 / blocksize
    return q + 2 * 2 if path == "reference" else q


def kernel_fits(hidden: int, inter: int, blocksize: int) -> bool:
    """Whether moespeq's CPU kernel takes a draft of these shapes (its layout as stored)."""
    from moespeq_cli import kernels

    return kernels.available() and blocksize % 64 == 0 and hidden % blocksize == 0 and inter % blocksize == 0


def packable(hidden: int, inter: int, blocksize: int) -> bool:
    """Whether bitsandbytes' packed CPU kernel can run a draft of these shapes here."""
    F = _bnb()
    if not all(hasattr(F, n) for n in ("_convert_weight_packed_for_cpu", "_convert_weight_packed_for_cpu_inverse")):
        return False
    has = getattr(F, "has_avx512bf16", None)
    if has is None or not has():
        return False
    # out features in blocks of 32, in features whole quantization blocks (gate/up: I x H, down: H x I)
    return inter % 32 == 0 and hidden % 32 == 0 and hidden % blocksize == 0 and inter % blocksize == 0


def planned_path(device_type: str, hidden: int, inter: int, blocksize: int) -> str:
    """The kernel a freshly quantized draft's experts run on a device of ``device_type``,
    before any is loaded (``moespeq plan`` prices it): ``QuantizedExperts.path`` of the
    loaded draft, whose CPU experts are packed for bitsandbytes' kernel where moespeq's
    cannot take them (executors/draft.py)."""
    if device_type == "cuda":
        return "cuda"
    if kernel_fits(hidden, inter, blocksize):
        return "kernel"
    return "packed" if packable(hidden, inter, blocksize) else "reference"


class QuantizedExperts:
    """4-bit copies of every routed expert: ``q[(layer, expert)] = [(packed, state)] * 3``,
    the canonical gate, up ``[I, H]`` and down ``[H, I]`` (models/expert_format.py: a
    fused checkpoint's layout is converted when quantizing). A format with biases
    (gpt-oss) keeps them unquantized in ``bias[(layer, expert)]`` (gate, up, down), and
    its activation is the format's."""

    def __init__(
        self,
        q: dict,
        method: str,
        blocksize: int,
        dtype: torch.dtype,
        hidden: int,
        inter: int,
        fmt: ExpertFormat = HF_EXPERTS,
        bias: dict | None = None,
    ):
        self.q, self.method, self.blocksize, self.dtype = q, method, blocksize, dtype
        self.hidden, self.inter = hidden, inter
        self.format = fmt
        self.bias: dict = bias if bias is not None else {}
        self.cpu_packed: set = set()  # experts in bitsandbytes' packed CPU layout
        self._kernel_ready: bool | None = None
        self.use_kernel = True  # False: moespeq's CPU kernel stays off (calibrate times the other paths)

    @classmethod
    def quantize(
        cls,
        ckpt: Checkpoint,
        method: str = "nf4",
        blocksize: int = 64,
        dtype: torch.dtype | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> QuantizedExperts:
        """Quantize every routed expert into memory (``quantized_experts``); ``moespeq
        quantize`` streams them to a file instead (``write_draft``)."""
        q, bias = {}, {}
        for key, parts, b in quantized_experts(ckpt, method, blocksize, dtype, progress):
            q[key] = parts
            if b is not None:
                bias[key] = b
        c = ckpt.config
        fmt = c.expert_format
        return cls(q, method, blocksize, dtype or c.dtype, c.hidden_size, c.expert_intermediate, fmt, bias)

    def weights(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The expert's dequantized canonical matrices (standard layout only): each weight
        ``table[code] * absmax`` (quant/dequant.py; bitsandbytes' own where the statistics
        are double-quantized). bitsandbytes 0.50's CPU ``dequantize_4bit`` returns wrong
        values wherever a matrix's width is not a multiple of the block, its CUDA kernel
        right ones: the op here computes what that kernel does on every device."""
        from moespeq_cli.quant.dequant import dequantize_4bit

        out = []
        for p, s in self.q[(layer, expert)]:
            if s.nested or s.absmax.dtype != torch.float32:
                out.append(_bnb().dequantize_4bit(p, s).to(self.dtype))
            else:
                flat = dequantize_4bit(
                    p.view(1, -1), s.absmax.view(1, -1), s.code, s.blocksize, s.quant_type, self.dtype
                )
                out.append(flat[0, : s.shape.numel()].view(s.shape))  # an odd count's last byte holds one
        return tuple(out)  # type: ignore[return-value]

    def forward_reference(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Dequantize, then a dense matmul: the reference every fast path is tested against."""
        if (layer, expert) in self.cpu_packed:
            raise RuntimeError("forward_reference needs the standard layout, and this expert is packed")
        w = self.weights(layer, expert)
        if w[0].dtype != x.dtype:
            w = tuple(t.to(x.dtype) for t in w)
        return self.format.forward_canonical(x, *w, self._bias((layer, expert), x.dtype))

    def _bias(self, key: tuple[int, int], dtype: torch.dtype) -> tuple | None:
        b = self.bias.get(key)
        return None if b is None else tuple(t.to(dtype) for t in b)

    def path(self, key: tuple[int, int], device_type: str) -> str:
        """The kernel expert ``key`` runs on a device of ``device_type``: "kernel"
        (moespeq's CPU kernel), "packed" (bitsandbytes' CPU kernel), "cuda"
        (``matmul_4bit``) or "reference" (dequantize, then a dense matmul). ``forward``
        dispatches on it, and the mock prices it."""
        if device_type == "cuda":
            return "cuda"
        if key in self.cpu_packed:
            return "packed"
        return "kernel" if self.kernel_ready() else "reference"

    def kernel_ready(self) -> bool:
        """Whether moespeq's CPU kernel computes this draft's experts (on the CPU)."""
        if not self.use_kernel:
            return False
        if self._kernel_ready is None:
            parts = [part for each in self.q.values() for part in each]
            self._kernel_ready = kernel_fits(self.hidden, self.inter, self.blocksize) and all(
                p.is_contiguous() and not s.nested and s.absmax.dtype == s.code.dtype == torch.float32 for p, s in parts
            )
        return self._kernel_ready

    def bytes_per_weight(self, path: str) -> float:
        """What the kernel streams per weight (``path_bytes_per_weight``)."""
        return path_bytes_per_weight(path, self.blocksize)

    def forward(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, H] -> [n, H] on the fastest path for the expert's device."""
        key = (layer, expert)
        path = self.path(key, x.device.type)
        if path == "reference":
            return self.forward_reference(layer, expert, x)
        (gp, gs), (up, us), (dp, ds) = self.q[key]
        if path == "kernel":
            from moespeq_cli import kernels

            xb, bias, rows = x.float(), self._bias(key, torch.float32), kernels.MAX_ROWS

            def product(a, packed, state):  # a prompt's many rows in blocks (the result is the same)
                parts = [
                    kernels.linear_nf4(
                        a[r : r + rows], packed, state.absmax, state.code, self.blocksize, state.shape[0]
                    )
                    for r in range(0, a.shape[0], rows)
                ]
                return parts[0] if len(parts) == 1 else torch.cat(parts)

        elif path == "packed":
            F = _bnb()
            xb = x.to(torch.bfloat16)
            bias = self._bias(key, torch.bfloat16)

            def product(a, packed, state):
                return F.gemv_4bit(a, packed, state=state)
        else:  # cuda
            import bitsandbytes as bnb

            xb, bias = x, self._bias(key, x.dtype)

            def product(a, packed, state):
                return bnb.matmul_4bit(a, packed.t(), quant_state=state)

        g, u = product(xb, gp, gs), product(xb, up, us)
        if bias is not None:
            g, u = g + bias[0], u + bias[1]
        y = product(self.format.activate(g, u), dp, ds)
        if bias is not None:
            y = y + bias[2]
        return y.to(x.dtype)

    # -- the CPU kernel's layout ---------------------------------------------------
    def packable(self) -> bool:
        """Whether bitsandbytes' packed CPU kernel can run this draft's experts here."""
        return packable(self.hidden, self.inter, self.blocksize)

    def pack_cpu(self, keys=None) -> int:
        """Repack the CPU-resident experts in ``keys`` (default: all) for the packed kernel,
        once and for good (the layout keeps each block's scale in bf16: a packed expert is
        never moved or saved); returns how many were packed (0 where the kernel cannot
        run)."""
        if not self.packable():
            return 0
        from moespeq_cli.quant.cpu_layout import pack_for_cpu

        F = _bnb()
        n = 0
        for key, parts in self.q.items():
            if key in self.cpu_packed or (keys is not None and key not in keys) or parts[0][0].device.type != "cpu":
                continue
            self.q[key] = [pack_for_cpu(p, s, F) for p, s in parts]
            self.cpu_packed.add(key)
            n += 1
        return n

    @property
    def bytes_per_expert(self) -> int:
        key, parts = next(iter(self.q.items()))
        return expert_bytes(parts, self.bias.get(key))

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_expert * len(self.q)

    def to(self, device: torch.device, keys=None) -> QuantizedExperts:
        """Move the experts in ``keys`` (default: all) to ``device``; the rest stay put."""
        if torch.device(device).type != "cpu" and (self.cpu_packed if keys is None else self.cpu_packed & set(keys)):
            raise RuntimeError("these draft experts are packed for the CPU kernel; move them before packing")
        for key, parts in self.q.items():
            if keys is not None and key not in keys:
                continue
            moved = []
            for packed, state in parts:
                state.to(device)
                moved.append((packed.to(device), state))
            self.q[key] = moved
            if key in self.bias:
                self.bias[key] = tuple(t.to(device) for t in self.bias[key])
        return self

    def stack(self, layers, device: torch.device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Each of ``layers``' experts laid end to end on ``device``, for the layer's grouped
        computation (runtime/executors/draft.py): ``{layer: (codes [E, 3 I H / 2] uint8,
        absmax [E, 3 I H / blocksize] float32)}``, a row an expert, gate | up | down. The
        experts' own tensors become views of their rows, so nothing is held twice and the
        expert-by-expert path still finds them. The standard layout only, every block's
        scale float32 and not double-quantized (``stackable``)."""
        blocks = {}
        for layer in layers:
            keys = sorted(k for k in self.q if k[0] == layer)
            if [e for _, e in keys] != list(range(len(keys))):  # a row is its expert (executors/draft.py)
                raise ValueError(f"layer {layer} of this draft lacks experts: it cannot be stacked")
            parts = [self.q[k] for k in keys]
            n_codes = sum(p.numel() for p, _ in parts[0])
            n_scales = sum(s.absmax.numel() for _, s in parts[0])
            codes = torch.empty(len(keys), n_codes, dtype=torch.uint8, device=device)
            absmax = torch.empty(len(keys), n_scales, dtype=torch.float32, device=device)
            for row, (key, each) in enumerate(zip(keys, parts, strict=True)):
                at = sc = 0
                views = []
                for packed, state in each:
                    c = codes[row, at : at + packed.numel()]
                    c.copy_(packed.flatten())
                    a = absmax[row, sc : sc + state.absmax.numel()]
                    a.copy_(state.absmax.flatten())
                    at, sc = at + packed.numel(), sc + state.absmax.numel()
                    state.absmax = a.view(state.absmax.shape)
                    state.code = state.code.to(device)
                    views.append((c.view(packed.shape), state))
                self.q[key] = views
            blocks[layer] = (codes, absmax)
        return blocks

    def stackable(self) -> bool:
        """Whether ``stack`` takes this draft: the standard layout (nothing packed for a CPU
        kernel), float32 block scales, not double-quantized, no biases, and every matrix a
        whole number of blocks (so that experts end to end dequantize as one tensor)."""
        parts = [part for each in self.q.values() for part in each]
        return (
            bool(parts)
            and not self.cpu_packed
            and not self.bias
            and all(
                p.dtype == torch.uint8
                and p.is_contiguous()
                and not s.nested
                and s.absmax.dtype == torch.float32
                and s.absmax.numel() * self.blocksize == 2 * p.numel()
                for p, s in parts
            )
        )

    def drop(self) -> None:
        """Let go of every expert (the draft's memory is given back for good)."""
        self.q.clear()
        self.bias.clear()

    def zero_(self) -> QuantizedExperts:
        """A deliberately broken draft (all expert outputs zero): for tests."""
        for parts in self.q.values():
            for _packed, state in parts:
                state.absmax.zero_()
        return self

    # -- on disk ----------------------------------------------------------------
    def save(self, out: Path, source: Checkpoint, fp: str | None = None, stale_ok: bool = False) -> Path:
        """Write the draft to ``out`` (``write_draft``); hold ``draft_lock(out)`` around
        quantize-and-save."""
        if self.cpu_packed:
            raise RuntimeError("a draft packed for the CPU kernel cannot be saved (its scales are rounded to bf16)")
        experts = ((key, parts, self.bias.get(key)) for key, parts in self.q.items())
        return write_draft(out, source, experts, self.method, self.blocksize, self.dtype, fp, stale_ok)[0]

    @classmethod
    def load(cls, path: Path, source: Checkpoint, dtype: torch.dtype | None = None) -> QuantizedExperts:
        from safetensors import SafetensorError, safe_open

        F = _bnb()
        path = Path(path)
        if not is_dir(path):
            raise UsageError(f"--draft {shown(path)} is not a draft directory; build one with `moespeq quantize`")
        m = read_json(
            path / "manifest.json",
            "rebuild the draft with `moespeq quantize`",
            missing=f"{path} is not a moespeq draft (no manifest.json); build one with `moespeq quantize`",
        )
        if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
            if m.get("format") == FORMAT:  # another version's: quantize replaces it
                raise CheckpointError(
                    f"{path} is a draft of another moespeq version; rebuild it with `moespeq quantize`"
                )
            raise CheckpointError(
                f"{path} holds a manifest.json that is not a moespeq draft's; move the directory away (or delete "
                "it) and run `moespeq quantize`, or run with --draft none"
            )
        if m.get("source_fingerprint") != fingerprint(source):  # (only a --draft given: run checks its own)
            kind = m.get("model_type")
            other = f" (a {kind} model)" if isinstance(kind, str) and kind != source.config.model_type else ""
            raise UsageError(
                f"--draft {shown(path)} was built from a different checkpoint than {source.path}{other}; give this "
                "checkpoint's draft (or leave --draft out), or rebuild it with `moespeq quantize`"
            )
        method, blocksize = m.get("method"), m.get("blocksize")
        if method not in METHODS or blocksize not in BLOCKSIZES:
            raise CheckpointError(
                f"{path / 'manifest.json'} names method {method!r}, blocksize {blocksize!r}; rebuild the draft"
            )
        c = source.config
        dtype = dtype or c.dtype
        weights = path / "draft.safetensors"
        status, _ = file_status(weights)
        if status != "file":
            raise CheckpointError(f"the draft in {path} has no draft.safetensors ({status}); rebuild it")
        fmt = c.expert_format
        shapes = fmt.matrix_shapes(c.hidden_size, c.expert_intermediate)
        q, bias = {}, {}
        try:
            with safe_open(str(weights), framework="pt") as f:  # the header, validated
                keys = set(f.keys())
            data = TensorFile(weights, "rebuild the draft")  # read with pread: a cut file is an error, not a SIGBUS
            try:
                for layer in c.moe_layers:
                    for e in range(c.num_experts):
                        parts, biases = [], []
                        for proj, shape in zip(PROJ, shapes, strict=True):
                            prefix = f"layers.{layer}.experts.{e}.{proj}"
                            parts.append(_load_part(data, keys, prefix, shape, method, blocksize, path, F))
                            if fmt.biased:
                                biases.append(_load_bias(data, keys, prefix, shape[0], path))
                        q[(layer, e)] = parts
                        if biases:
                            bias[(layer, e)] = tuple(b.to(c.dtype) for b in biases)  # as stored (quantize)
            finally:
                data.close()
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{weights} is truncated or corrupt ({err}); rebuild the draft") from None
        return cls(q, method, blocksize, dtype, c.hidden_size, c.expert_intermediate, fmt, bias)


def quantized_experts(
    ckpt: Checkpoint,
    method: str = "nf4",
    blocksize: int = 64,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[tuple[int, int], list, tuple | None]]:
    """Every routed expert quantized, one at a time: ``(key, [(packed, state)] for gate, up,
    down, (gate, up, down) biases or None)``. Each is read from the checkpoint's files into
    one reused buffer (the disk tier's reader, past the page cache), so a model larger than
    RAM is never held; what the caller keeps of the results is its own."""
    from moespeq_cli.runtime.tiers.store import expert_reader

    check_method(method, blocksize)
    c = ckpt.config
    if c.expert_format.four_bit:
        raise UsageError(
            f"the experts of {ckpt.path} are stored 4-bit already ({c.expert_format.quant}): a 4-bit draft would be "
            "no smaller; moespeq runs this model without one (speculation off)"
        )
    F = _bnb()
    dtype = dtype or c.dtype
    keys = draft_keys(ckpt)
    ckpt.check_experts()  # every expert present, of its shape
    with expert_reader(ckpt) as read:
        for done, key in enumerate(keys, 1):
            parts = read(*key)
            for name, w in zip(c.expert_keys(*key), parts, strict=True):
                if w.is_floating_point() and not bool(torch.isfinite(w.float()).all()):
                    raise CheckpointError(f"tensor {name} in {ckpt.path} holds NaN or infinite values; it is corrupt")
            *mats, biases = c.expert_format.canonical(parts)
            quantized = [
                F.quantize_4bit(w.to(dtype).contiguous(), blocksize=blocksize, quant_type=method) for w in mats
            ]
            # copies: the parts are views of the one buffer every expert is read into; biases
            # held as stored, widened at use (``_bias``): the plan counts them so
            kept = None if biases is None else tuple(b.to(c.dtype, copy=True).contiguous() for b in biases)
            del parts, mats, biases
            give_back_freed_memory()  # the expert's temporaries
            if progress:
                progress(done, len(keys))
            yield key, quantized, kept
            del quantized, kept  # not held while the next is read


def draft_keys(ckpt: Checkpoint) -> list[tuple[int, int]]:
    """Every routed expert of the checkpoint, in the draft's order."""
    c = ckpt.config
    return [(layer, e) for layer in c.moe_layers for e in range(c.num_experts)]


def expert_bytes(parts, biases) -> int:
    """An expert's bytes in the draft as planned: codes, block scales and biases."""
    return sum(t.numel() * t.element_size() + s.absmax.numel() * s.absmax.element_size() for t, s in parts) + sum(
        t.numel() * t.element_size() for t in biases or ()
    )


def write_draft(
    out: Path,
    source: Checkpoint,
    experts: Iterable[tuple[tuple[int, int], list, tuple | None]],
    method: str,
    blocksize: int,
    dtype: torch.dtype,
    fp: str | None = None,
    stale_ok: bool = False,
) -> tuple[Path, int]:
    """Write ``experts`` (``quantized_experts``' items, every one of ``source``'s) as a
    draft at ``out``, one expert at a time (quant/draft_file.py: memory holds the one being
    written), and return ``(out, bytes)``. Atomic: written into a temporary directory
    beside it, then swapped in (``replace_dir``); a failure or a kill mid-way leaves
    ``out`` as it was. ``out`` must be absent or a draft of ``source`` (``check_out``)."""
    from moespeq_cli.quant.draft_file import expert_tensors, write_experts

    out = real_out(out)
    fp = fp or fingerprint(source)
    check_out(out, fp, stale_ok)
    keys = draft_keys(source)
    per_expert = []

    def tensors():
        for key, parts, biases in experts:
            if not per_expert:
                per_expert.append(expert_bytes(parts, biases))
            yield key, expert_tensors(key, parts, biases, PROJ)
            del parts, biases  # written: not held while the next is quantized

    tmp = None
    try:  # (made inside: a Ctrl-C or SIGTERM right after it is made still removes it)
        tmp = Path(tempfile.mkdtemp(prefix=stem(TMP_PREFIX, out), dir=out.parent))
        write_experts(tmp / "draft.safetensors", tensors(), keys, {"format": FORMAT})
        size = per_expert[0] * len(keys)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "moespeq_version": __version__,
            "method": method,
            "blocksize": blocksize,
            "dtype": str(dtype).split(".")[-1],
            "model_type": source.config.model_type,
            "source_fingerprint": fp,
            "experts": len(keys),
            "bytes": size,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        with open(tmp / "manifest.json", "rb") as fh:
            os.fsync(fh.fileno())
        for f in ("draft.safetensors", "manifest.json"):
            os.chmod(tmp / f, new_file_mode(out / f))  # a replaced draft's modes, else the umask's
        os.chmod(tmp, new_file_mode(out) if os.path.isdir(out) else 0o777 & ~umask())  # not mkdtemp's 0700
        replace_dir(tmp, out)
    except OSError as e:
        raise MoespeqError(
            f"cannot write the draft to {shown(out)} ({e.strerror}); check the disk and directory"
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out, size


def _load_part(f, keys: set, prefix: str, shape: tuple, method: str, blocksize: int, path: Path, F):
    """One projection's (packed, QuantState), checked against the shape the config implies:
    a forged or damaged draft is a CheckpointError, never a wrong answer later."""
    bad = f"the draft in {path} has a damaged or missing {prefix}"
    if f"{prefix}.qweight" not in keys:
        raise CheckpointError(f"the draft in {path} lacks {prefix}; rebuild it with `moespeq quantize`")
    sd = {k[len(prefix) + 1 :]: f.read(k) for k in keys if k.startswith(prefix + ".")}
    sd.pop("bias", None)
    packed = sd.pop("qweight")
    try:
        state = F.QuantState.from_dict(sd, device=torch.device("cpu"))
    except Exception:  # noqa: BLE001 - bitsandbytes raises KeyError, ValueError, json errors...
        raise CheckpointError(f"{bad}; rebuild it with `moespeq quantize`") from None
    n = shape[0] * shape[1]
    ok = (
        packed.dtype == torch.uint8
        and packed.numel() == (n + 1) // 2
        and tuple(state.shape) == tuple(shape)
        and state.quant_type == method
        and state.blocksize == blocksize
        and state.absmax is not None
        and state.absmax.numel() == -(-n // blocksize)
        and state.absmax.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and bool(torch.isfinite(state.absmax).all())
        and state.code is not None
        and state.code.numel() == 16
        and bool(torch.isfinite(state.code).all())
        and state.dtype in (torch.float32, torch.float16, torch.bfloat16)
    )
    if not ok:
        raise CheckpointError(
            f"{bad} (its sizes or values are wrong for this checkpoint); rebuild it with `moespeq quantize`"
        )
    # bitsandbytes' CUDA 4-bit kernels take float32 scales only; a half one widens exactly
    state.absmax = state.absmax.float()
    return packed, state


def _load_bias(f, keys: set, prefix: str, size: int, path: Path) -> torch.Tensor:
    """One projection's bias (formats with biases: gpt-oss), checked like the weights."""
    name = f"{prefix}.bias"
    b = f.read(name) if name in keys else None
    if b is None or tuple(b.shape) != (size,) or not b.is_floating_point() or not bool(torch.isfinite(b).all()):
        raise CheckpointError(
            f"the draft in {path} has a damaged or missing {name}; rebuild it with `moespeq quantize`"
        )
    return b
