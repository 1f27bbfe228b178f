"""The disk tier's reader: every expert's bytes exactly as safetensors holds them, with
O_DIRECT (aligned block reads through a bounce buffer) and with the fallback where the
file system refuses it, in chunks, and asynchronously."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from moespeq_cli.errors import CheckpointError
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.models.tensor_file import TensorFile
from moespeq_cli.runtime.tiers.disk import BLOCK, DiskReader, Extent, coalesce


def expert_extents(ck: Checkpoint, layer: int, e: int) -> list[Extent]:
    table = {}
    for name in {ck._where[k] for k in ck.config.expert_keys(layer, e)}:
        table.update(TensorFile(ck.path / name).table)
    return sorted((table[k][0] for k in ck.config.expert_keys(layer, e)), key=lambda x: x.offset)


def expected_bytes(ck: Checkpoint, layer: int, e: int) -> torch.Tensor:
    keys = sorted(ck.config.expert_keys(layer, e), key=lambda k: expert_offset(ck, k))
    return torch.cat([ck.tensor(k).contiguous().view(torch.uint8).reshape(-1) for k in keys])


def expert_offset(ck: Checkpoint, key: str) -> int:
    return TensorFile(ck.path / ck._where[key]).table[key][0].offset


@pytest.fixture
def ckpt(tiny, tmp_path):
    src, _ = tiny("mixtral", "wide")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return Checkpoint(dst)


@pytest.mark.parametrize("bounce", [64 << 20, 3 * BLOCK])  # one read per expert, or many chunks
def test_every_expert_reads_back_exactly(ckpt, bounce):
    with DiskReader(threads=2, bounce_bytes=bounce) as reader:
        for layer in ckpt.config.moe_layers:
            for e in range(ckpt.config.num_experts):
                want = expected_bytes(ckpt, layer, e)
                got = torch.empty_like(want)
                reader.read_into(expert_extents(ckpt, layer, e), got)
                assert torch.equal(got, want), (layer, e)
        assert reader.direct in (True, False)
        assert reader.bytes_read == sum(
            expected_bytes(ckpt, layer, e).numel()
            for layer in ckpt.config.moe_layers
            for e in range(ckpt.config.num_experts)
        )


def test_an_experts_projections_are_one_read(ckpt):
    assert len(coalesce(expert_extents(ckpt, 1, 3))) == 1


def test_fallback_where_o_direct_is_refused(ckpt, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):  # what tmpfs (before Linux 6.6) and some NFS say
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    advised = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, how: advised.append((off, n, how)))
    with DiskReader() as reader:
        want = expected_bytes(ckpt, 0, 5)
        got = torch.empty_like(want)
        reader.read_into(expert_extents(ckpt, 0, 5), got)
        assert torch.equal(got, want)
        assert reader.direct is False
    assert advised and all(how == os.POSIX_FADV_DONTNEED for _, _, how in advised)


def test_reads_are_asynchronous(ckpt):
    with DiskReader(threads=2, delay_s=0.3) as reader:
        reads, dests = [], []
        for e in range(4):
            dest = torch.empty_like(expected_bytes(ckpt, 0, e))
            reads.append(reader.submit(expert_extents(ckpt, 0, e), dest))
            dests.append(dest)
        assert not any(r.done() for r in reads)  # submit returned while the reads were in flight
        for e, (r, dest) in enumerate(zip(reads, dests, strict=True)):
            r.wait()
            assert torch.equal(dest, expected_bytes(ckpt, 0, e))


def test_a_file_truncated_after_opening(ckpt, tmp_path):
    ext = expert_extents(ckpt, 1, ckpt.config.num_experts - 1)
    last = ext[-1]
    f = Path(last.file)
    with open(f, "r+b") as fh:
        fh.truncate(last.offset + last.length // 2)
    with DiskReader() as reader, pytest.raises(CheckpointError, match="truncated"):
        reader.read_into(ext, torch.empty(sum(e.length for e in ext), dtype=torch.uint8))


@pytest.mark.parametrize(
    "family,variant,dtype",
    [
        ("mixtral", "gqa", torch.float32),
        ("qwen2_moe", "shared", torch.bfloat16),
        ("deepseek_v2", "lite", torch.float32),
    ],
)
def test_disk_experts_views_equal_the_checkpoint(tiny, family, variant, dtype):
    from moespeq_cli.runtime.tiers.disk import DiskExperts

    path, _ = tiny(family, variant, dtype)
    ck = Checkpoint(path)
    store = DiskExperts(ck)
    assert store.dtype == dtype  # the checkpoint's dtype, never widened
    assert store.reads_per_expert() == 1
    buf = store.empty_buffer()
    with DiskReader() as reader:
        for layer in ck.config.moe_layers:
            for e in range(ck.config.num_experts):
                store.read((layer, e), buf, reader)
                for got, want in zip(store.views(buf), ck.expert(layer, e), strict=True):
                    assert torch.equal(got, want), (layer, e)


def rename_zeroed_copy_over(path: Path, tmp_path: Path) -> None:
    """A new file with every tensor zeroed renamed over ``path``, as a download or
    save_pretrained puts a new shard in place."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "replacement.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(path).items()}, other)
    os.replace(other, path)


def test_a_shard_renamed_over_mid_run_is_not_read(ckpt, tmp_path):
    """The disk tier reads the files the checkpoint holds open (``/proc/self/fd``), not
    whatever their names point at by the first read."""
    from moespeq_cli.runtime.tiers.disk import DiskExperts
    from moespeq_cli.runtime.tiers.store import expert_reader

    store = DiskExperts(ckpt)
    want = [ckpt.expert(layer, e) for layer in ckpt.config.moe_layers for e in (0, 5)]
    rename_zeroed_copy_over(Path(expert_extents(ckpt, 0, 0)[0].file), tmp_path)
    buf = store.empty_buffer()
    with DiskReader() as reader:
        reader.hold(store.held)
        got = [
            [t.clone() for t in store.views(store.read((layer, e), buf, reader))]
            for layer in ckpt.config.moe_layers
            for e in (0, 5)
        ]
    for g, w in zip(got, want, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(g, w, strict=True))
    with expert_reader(ckpt) as read:  # the RAM tier's loader reads them so too
        assert all(torch.equal(a, b) for a, b in zip(read(0, 5), want[1], strict=True))


def test_without_proc_a_replaced_shard_is_refused(ckpt, tmp_path, monkeypatch):
    """Where /proc/self/fd is not there the name is opened, and must still be the file
    the checkpoint opened."""
    from moespeq_cli.runtime.tiers import disk
    from moespeq_cli.runtime.tiers.disk import DiskExperts

    monkeypatch.setattr(disk, "PROC_FD", str(tmp_path / "no-proc" / "{}"))
    store = DiskExperts(ckpt)
    buf = store.empty_buffer()
    with DiskReader() as reader:
        reader.hold(store.held)
        parts = store.views(store.read((0, 1), buf, reader))  # the same file by name: read
        assert all(torch.equal(a, b) for a, b in zip(parts, ckpt.expert(0, 1), strict=True))
    rename_zeroed_copy_over(Path(expert_extents(ckpt, 0, 0)[0].file), tmp_path)
    with DiskReader() as reader, pytest.raises(CheckpointError, match="was replaced while moespeq was running"):
        reader.hold(store.held)
        store.read((0, 1), buf, reader)


def test_the_reader_keeps_its_own_copy_of_the_held_files(ckpt, tmp_path):
    """The checkpoint's descriptors may close before the reader's first read (a number
    then reused for another file): the reader holds copies of its own, closed with it."""
    from moespeq_cli.runtime.tiers.disk import DiskExperts

    store = DiskExperts(ckpt)
    want = [t.clone() for t in ckpt.expert(0, 3)]
    buf = store.empty_buffer()
    reader = DiskReader()
    reader.hold(store.held)
    for tf in ckpt._data.values():
        tf.close()  # the checkpoint's own descriptors gone
    other = os.open(tmp_path / "reuses-a-number", os.O_CREAT | os.O_RDWR)
    try:
        got = store.views(store.read((0, 3), buf, reader))
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        copies = [h.fd for h in reader.held.values()]
        reader.close()
        for fd in copies:
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        os.close(other)


def test_a_shard_written_in_place_mid_run_stops_the_reads(ckpt):
    """`cp other.safetensors shard.safetensors` writes into the file held open: its reads
    then gave another file's bytes at this file's offsets (tokens silently wrong, found by
    QA on a 2,000-token run). A read after such a write stops with one line."""
    import time

    from moespeq_cli.runtime.tiers.disk import DiskExperts

    store = DiskExperts(ckpt)
    buf = store.empty_buffer()
    shard = Path(expert_extents(ckpt, 0, 0)[0].file)
    with DiskReader() as reader:
        reader.hold(store.held)
        store.read((0, 0), buf, reader)  # as held: read
        time.sleep(0.01)
        data = shard.read_bytes()
        with open(shard, "r+b") as f:  # the same bytes but one, written in place
            f.seek(len(data) - 1)
            f.write(bytes([data[-1] ^ 1]))
        with pytest.raises(CheckpointError, match="was written while moespeq was reading it"):
            store.read((0, 0), buf, reader)
    # written before the reader held it (between opening the checkpoint and loading): as
    # the header was read is what counts
    ck = Checkpoint(ckpt.path)
    time.sleep(0.02)  # (file times move in the kernel's coarse ticks)
    with open(shard, "r+b") as f:
        f.seek(len(data) - 1)
        f.write(bytes([data[-1]]))
    store = DiskExperts(ck)
    with DiskReader() as reader, pytest.raises(CheckpointError, match="was written while"):
        reader.hold(store.held)
        store.read((0, 0), buf, reader)
