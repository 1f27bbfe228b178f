"""A safetensors file read with ``pread``, never through a memory map.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes. ``safe_open`` maps the whole
file and copies a tensor out of the map; if the file is cut short while it is mapped
(``cp`` of a new download over it, a full disk's partial copy), touching a page past the
new end is a SIGBUS: the process dies with "Bus error", no message of ours, no cleanup.
Reading with ``pread`` instead, the same cut is a short read, said in one line.

``TensorFile`` holds the file open from the start (a file renamed over it later is not
read half old, half new) and reads each tensor, or one row of it, into fresh memory. The
header is validated by ``safe_open`` where the file is first opened (Checkpoint, the
draft), and read again here from the file held open; a header that will not parse is a
``CheckpointError``, a row past a tensor's first dimension too.
"""

from __future__ import annotations

import json
import os
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from moespeq_cli.errors import CheckpointError

# safetensors' dtype names -> torch's (those torch has)
DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class Extent:
    """``length`` bytes at ``offset`` of ``file``."""

    file: str
    offset: int
    length: int


Entry = tuple[Extent, str, tuple[int, ...]]  # extent, safetensors dtype, shape


def safetensors_extents(path: Path, fd: int) -> dict[str, Entry]:
    """name -> (extent, safetensors dtype, shape) for every tensor of the file ``path``
    open as ``fd``, from its header alone."""
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    header = json.loads(os.pread(fd, n, 8))
    base = 8 + n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        out[name] = (Extent(str(path), base + start, end - start), entry["dtype"], tuple(entry["shape"]))
    return out


def truncated(e: Extent, remedy: str = "download it again") -> CheckpointError:
    return CheckpointError(f"{e.file} ended early (expected {e.length} bytes at {e.offset}): it is truncated; {remedy}")


def pread_into(fd: int, buf: memoryview, offset: int, direct: bool = False) -> int:
    """Fill ``buf`` from ``offset``; fewer bytes only at the end of the file. A short
    direct read is the end of the file too (retrying would read at an unaligned offset,
    which some file systems refuse)."""
    total = 0
    while total < len(buf):
        n = os.preadv(fd, [buf[total:]], offset + total)
        if n == 0:
            break
        total += n
        if direct and total < len(buf):
            break
    return total


class TensorFile:
    """One safetensors file, held open, read a tensor at a time."""

    def __init__(self, path: Path, remedy: str = "download it again"):
        self.path, self.remedy = Path(path), remedy
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._close = weakref.finalize(self, os.close, self.fd)
        st = os.fstat(self.fd)
        self.stamp = (st.st_size, st.st_mtime_ns)  # as its header was read: a write since shows
        try:  # now: the header safe_open validated, from the file held open
            self.table = safetensors_extents(self.path, self.fd)
        except (OSError, ValueError, struct.error, KeyError, TypeError) as e:
            self.close()
            raise CheckpointError(f"{self.path} has a damaged header ({e}); {remedy}") from None

    def read(self, name: str, row: int | None = None) -> torch.Tensor:
        """Tensor ``name`` (or its row ``row``) as stored, in memory of its own."""
        e, dtype_name, shape = self.table[name]
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"tensor {name} in {self.path} is {dtype_name}, a dtype moespeq does not read")
        if row is not None:
            if not shape or not 0 <= row < shape[0]:
                raise CheckpointError(
                    f"tensor {name} in {self.path} has no row {row} (shape {list(shape)}); {self.remedy}"
                )
            size = e.length // shape[0]
            e, shape = Extent(e.file, e.offset + row * size, size), shape[1:]
        out = torch.empty(e.length, dtype=torch.uint8)
        try:
            got = pread_into(self.fd, memoryview(out.numpy()), e.offset)
        except OSError as err:
            raise CheckpointError(f"cannot read {name} from {self.path} ({err.strerror}); {self.remedy}") from None
        if got < e.length:
            raise truncated(e, self.remedy)
        return out.view(dtype).view(shape)

    def close(self) -> None:
        self._close()


HEADER_LIMIT = 100 * 2**20  # a safetensors header past this is not one (safetensors' own limit)


def damage(path: Path) -> str | None:
    """What is wrong with the safetensors file ``path``, from its header and size alone
    (None: nothing): "unreadable" (permissions), "truncated" (shorter than its header
    says: a copy cut short), "damaged" (no header), or what else it is (a FIFO, a
    dangling link). What opening it would say, without reading its tensors."""
    from moespeq_cli.fs import file_status

    status, size = file_status(path)
    if status != "file":
        return status
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(HEADER_LIMIT, size - 8):
                return "truncated"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except PermissionError:
        return "unreadable"
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "damaged"
    return "truncated" if not isinstance(end, int) or 8 + n + end > size else None
