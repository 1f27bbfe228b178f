"""Weights read with pread, not through a memory map: a file cut short while moespeq
reads it is one line and exit 1, not "Bus error"; a file renamed over it is not read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import torch

from moespeq_cli.models.checkpoint import Checkpoint

# Each runs in a process of its own: through a memory map, the cut is a SIGBUS that
# kills the process (it would take pytest with it).
READ_AFTER_CUT = """
import os, sys
from moespeq_cli.errors import CheckpointError
from moespeq_cli.models.checkpoint import Checkpoint
ck = Checkpoint(sys.argv[1])
f = ck.path / "model.safetensors"
os.truncate(f, 8 + int.from_bytes(open(f, "rb").read(8), "little") + 64)  # the header and 64 bytes kept
c = ck.config
for read in (lambda: ck.tensor("lm_head.weight"), lambda: ck.expert(c.moe_layers[-1], c.num_experts - 1)):
    try:
        read()
        print("read")
    except CheckpointError as e:
        print(e)
"""

RUN_CUT_WHILE_LOADING = """
import os, sys
from moespeq_cli.models import checkpoint
opened = checkpoint.Checkpoint.__init__
def cut(self, path):
    opened(self, path)
    f = self.path / "model.safetensors"
    os.truncate(f, os.path.getsize(f) // 2)
checkpoint.Checkpoint.__init__ = cut
from moespeq_cli.entry import main
sys.argv = ["moespeq", *sys.argv[1:]]
main()
"""


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_a_checkpoint_cut_short_after_it_was_opened_is_an_error_not_a_bus_error(ckpt):
    r = python(READ_AFTER_CUT, str(ckpt))
    assert r.returncode == 0, (r.returncode, r.stderr[-400:])  # -7: SIGBUS
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all("ended early" in x and "it is truncated; download it again" in x for x in lines)


def test_a_fused_expert_row_of_a_cut_checkpoint_is_an_error(tiny, tmp_path):
    src, _ = tiny("gpt_oss", "alternating")  # one tensor per part for all of a layer's experts
    dst = tmp_path / "oss"
    shutil.copytree(src, dst)
    r = python(READ_AFTER_CUT, str(dst))
    assert r.returncode == 0, (r.returncode, r.stderr[-400:])
    assert r.stdout.count("it is truncated") == 2, r.stdout


def test_run_says_a_checkpoint_cut_while_loading_in_one_line(ckpt, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    args = ["run", str(ckpt), "-p", "hi", "-n", "3", "--backend", "mock", "--draft", "none"]
    r = subprocess.run(
        [sys.executable, "-c", RUN_CUT_WHILE_LOADING, *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 1, (r.returncode, r.stderr[-600:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "it is truncated" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_a_file_renamed_over_an_open_checkpoint_is_not_read(ckpt, tmp_path):
    """The file is held open from the start, as the map held it: a new download renamed
    into place is not read half old, half new."""
    ck = Checkpoint(ckpt)
    name = "lm_head.weight"
    before = ck.tensor(name).clone()
    other = tmp_path / "other.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = {k: v.zero_() if k == name else v for k, v in load_file(ckpt / "model.safetensors").items()}
    save_file(tensors, other)
    os.replace(other, ckpt / "model.safetensors")
    assert torch.equal(ck.tensor(name), before)
    assert not torch.equal(Checkpoint(ckpt).tensor(name), before)


def test_every_tensor_reads_as_safetensors_reads_it(tiny):
    from safetensors import safe_open

    for family, variant in (("mixtral", "gqa"), ("gpt_oss", "alternating"), ("deepseek_v3", "flat")):
        path, _ = tiny(family, variant)
        ck = Checkpoint(path)
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            for key in f.keys():
                want = f.get_tensor(key)
                got = ck._read(key)
                assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), key
            fused = ck.config.expert_format.fused
            for layer in ck.config.moe_layers[:1]:
                for got, k in zip(ck.expert(layer, 1), ck.config.expert_keys(layer, 1), strict=True):
                    want = f.get_slice(k)[1] if fused else f.get_tensor(k)
                    assert torch.equal(got, want.to(got.dtype)), k


DRAFT_CUT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from moespeq_cli.errors import CheckpointError
    from moespeq_cli.models import tensor_file
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.quant.draft import QuantizedExperts
    ck = Checkpoint(sys.argv[1])
    draft = Path(sys.argv[2])
    QuantizedExperts.quantize(ck).save(draft, ck)
    opened = tensor_file.TensorFile.__init__
    def cut(self, path, *a):
        opened(self, path, *a)
        if path.name == "draft.safetensors":
            os.truncate(path, os.path.getsize(path) // 2)
    tensor_file.TensorFile.__init__ = cut
    try:
        QuantizedExperts.load(draft, ck)
        print("loaded")
    except CheckpointError as e:
        print(e)
""")


def test_a_draft_cut_short_while_loading_is_an_error(ckpt, tmp_path):
    r = python(DRAFT_CUT, str(ckpt), str(tmp_path / "draft"))
    assert r.returncode == 0, (r.returncode, r.stderr[-400:])
    assert "it is truncated; rebuild the draft" in r.stdout, r.stdout


def test_a_header_cut_after_validation_and_a_row_past_the_end_are_errors(ckpt):
    import pytest

    from moespeq_cli.errors import CheckpointError
    from moespeq_cli.models.tensor_file import TensorFile

    f = TensorFile(ckpt / "model.safetensors")
    name = "lm_head.weight"
    rows = f.table[name][2][0]
    assert torch.equal(f.read(name, rows - 1), f.read(name)[rows - 1])
    for row in (rows, -1):
        with pytest.raises(CheckpointError, match="has no row"):
            f.read(name, row)
    os.truncate(ckpt / "model.safetensors", 4)
    with pytest.raises(CheckpointError, match="damaged header"):
        TensorFile(ckpt / "model.safetensors")
