"""The draft's weights file, written one expert at a time.

``moespeq quantize`` on Mixtral makes about 25 GB of 4-bit experts: more than many hosts
hold, and all of it was held, then handed to ``safetensors.torch.save_file`` (which
takes a dict of every tensor). Here the draft streams into its file instead: the first
expert's tensors give the layout of every expert (a projection's packed codes, block
scales, code table and bitsandbytes' JSON state have the same sizes in every expert of a
model), so the safetensors header -- names, dtypes, shapes, offsets -- is written first,
then each expert's bytes as it is quantized, and memory holds one expert.

The file is what ``save_file`` writes (the format is its specification: an 8-byte
little-endian header length, the JSON header padded with spaces to a multiple of 8, then
the tensors end to end), so ``safe_open`` reads it; its whole size is reserved before the
first expert is written (``posix_fallocate``), so a disk without room for it refuses at
once, not hours in. An expert whose tensors differ from the layout is a bug, raised.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

DTYPES = {
    torch.uint8: "U8",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}

Tensors = list[tuple[str, torch.Tensor]]  # one expert's, names relative to its prefix


def expert_tensors(key: tuple[int, int], parts, biases, projections: tuple[str, ...]) -> Tensors:
    """An expert's tensors under their names in the file: ``layers.L.experts.E.PROJ.`` then
    ``qweight``, the QuantState's packed dict (absmax, quant_map, its JSON) and ``bias``."""
    layer, e = key
    out = []
    for proj, (packed, state), b in zip(projections, parts, biases or (None,) * len(parts), strict=True):
        prefix = f"layers.{layer}.experts.{e}.{proj}"
        out.append((f"{prefix}.qweight", packed))
        out.extend((f"{prefix}.{k}", v) for k, v in state.as_dict(packed=True).items())
        if b is not None:
            out.append((f"{prefix}.bias", b))
    return out


def _layout(first: Tensors, first_key: tuple[int, int], keys: list[tuple[int, int]]) -> dict:
    """The header for every expert in ``keys``, each laid out as ``first`` is."""
    old = "layers.{}.experts.{}.".format(*first_key)
    header, at = {}, 0
    for layer, e in keys:
        for name, t in first:
            size = t.numel() * t.element_size()
            header[f"layers.{layer}.experts.{e}." + name[len(old) :]] = {
                "dtype": DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [at, at + size],
            }
            at += size
    return header


def _header_bytes(header: dict, metadata: dict) -> bytes:
    raw = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _fallocate(fd: int, size: int) -> int:
    """Linux's fallocate(2) on the whole file: 0, or the errno. Not glibc's
    ``posix_fallocate``, which on a file system without it (NFSv3, older ZFS) writes a byte
    into every block instead: six million writes before a 25 GB draft's first expert."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):  # not Linux's libc
        return errno.EOPNOTSUPP
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return 0 if fn(fd, 0, 0, size) == 0 else ctypes.get_errno()


def _reserve(fd: int, size: int) -> None:
    """Claim the file's blocks now (ENOSPC here, not at the end); where the file system
    cannot, the writes find out."""
    err = _fallocate(fd, size)
    if err and err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err))


def _write_expert(f, key, tensors: Tensors, expected: tuple[int, int], header: dict, start: int) -> None:
    if key != expected:
        raise RuntimeError(f"expert {key} came where {expected} was laid out")
    for name, t in tensors:
        h = header.get(name)
        if h is None or (DTYPES.get(t.dtype), list(t.shape)) != (h["dtype"], h["shape"]):
            raise RuntimeError(f"{name} ({t.dtype}, {tuple(t.shape)}) does not match the draft's layout")
        if f.tell() != start + h["data_offsets"][0]:
            raise RuntimeError(f"{name} is out of the draft's layout")
        f.write(memoryview(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy()))


def write_experts(
    path: Path,
    experts: Iterable[tuple[tuple[int, int], Tensors]],
    keys: list[tuple[int, int]],
    metadata: dict,
) -> None:
    """Write ``experts`` -- ``(key, tensors)`` in the order of ``keys``, each dropped once
    written -- as one safetensors file at ``path``."""
    it: Iterator = iter(experts)
    with open(path, "wb") as f:
        first = next(it, None)
        if first is None:
            raise ValueError("a draft has at least one expert")
        key, tensors = first
        header = _layout(tensors, key, keys)
        head = _header_bytes(header, metadata)
        total = max(h["data_offsets"][1] for h in header.values())
        _reserve(f.fileno(), len(head) + total)
        f.write(head)
        _write_expert(f, key, tensors, keys[0], header, len(head))
        first = tensors = None  # each expert is let go once written
        done = 1
        for key, tensors in it:
            if done == len(keys):
                raise RuntimeError(f"expert {key} came after the {len(keys)} laid out")
            _write_expert(f, key, tensors, keys[done], header, len(head))
            done += 1
            del tensors
        if done != len(keys):
            raise RuntimeError(f"{done} experts written of {len(keys)} laid out")
        f.flush()
        os.fsync(f.fileno())
