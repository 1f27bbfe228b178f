"""Checkpoint: a Hugging Face model directory opened lazily.

Only safetensors are read, never pickles (``.bin``/``.pt``), and no code from the
checkpoint is ever run. Every tensor is addressable on its own without reading the
others: ``tensor(name)`` reads one entry of its file with ``pread`` (models/tensor_file.py:
a file cut short while read is an error, not the SIGBUS of a memory map), which is what
lets the runtime move experts one at a time.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moespeq_cli.errors import CheckpointError
from moespeq_cli.fs import confined_name, describe, file_status, is_dir, read_text
from moespeq_cli.models import language_config, parse_config
from moespeq_cli.models.expert_format import FP8, fp8_dequantize
from moespeq_cli.models.tensor_file import DTYPES, TensorFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64", "F8_E4M3")
FP8_DTYPE = "F8_E4M3"  # block FP8 (quantization_config fp8): read with its ``_scale_inv``
# safetensors' dtype names -> torch's, for every dtype an expert part may be stored in
STORED_DTYPES = {name: DTYPES[name] for name in (*FLOAT_DTYPES, "U8")}
STORED_NAMES = {dtype: name for name, dtype in STORED_DTYPES.items()}


JSON_LIMIT = 64 * 2**20  # config, index, generation and draft files (tokenizer.json has its own)


def read_json(path: Path, remedy: str, missing: str | None = None, error=CheckpointError) -> dict:
    """A JSON object from ``path``; ``{}`` when absent unless ``missing`` (the error then).
    Anything but a regular file, a file over 64 MiB, or malformed JSON is ``error``
    (a CheckpointError unless told) that ends with ``remedy``."""
    status, _ = file_status(path)
    if status == "missing":
        if missing is not None:
            raise error(missing)
        return {}
    text = read_text(path, JSON_LIMIT, "file", error, remedy=remedy)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or an integer of 4300+ digits
        raise error(f"{path} is not valid JSON ({str(e)[:80]}); {remedy}") from None
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object; {remedy}")
    return data


def read_config(path: Path) -> dict:
    from moespeq_cli.model_ref import no_config

    return read_json(path / "config.json", "download the checkpoint again", missing=no_config(str(path)))


class Checkpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_dir(self.path):
            raise CheckpointError(
                f"checkpoint directory {self.path} does not exist; pass a model directory, an alias or a hub id"
            )
        self.raw_config, prefix = language_config(read_config(self.path))
        self.arch, self.config = parse_config(self.raw_config, str(self.path / "config.json"))
        if prefix:  # a multimodal checkpoint: the experts are read by their real names
            fmt = self.config.expert_format
            self.config.expert_format = dataclasses.replace(fmt, prefix=fmt.prefix.replace("model.", prefix, 1))
        self._files: dict[str, object] = {}  # safe_open's handles: the validated headers
        self._data: dict[str, TensorFile] = {}  # the same files, held open for reading
        self._where: dict[str, str] = {}
        self._real: dict[str, str] = {}  # "model.X" -> "model.language_model.X" (composite checkpoints)
        self.fingerprint: str | None = None  # the weights' identity, once a draft asked (quant/draft_store.py)
        for name in self._weight_files():
            try:
                handle = safe_open(str(self.path / name), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{self.path / name} is truncated or corrupt ({e}); download it again") from None
            self._files[name] = handle
            try:
                self._data[name] = TensorFile(self.path / name)
            except OSError as e:
                raise CheckpointError(f"cannot open {self.path / name} ({e.strerror}); check its permissions") from None
            for key in handle.keys():
                self._where[key] = name
                if prefix and key.startswith(prefix):
                    alias = "model." + key[len(prefix) :]
                    self._where[alias], self._real[alias] = name, key

    def _weight_files(self) -> list[str]:
        index = self.path / "model.safetensors.index.json"
        if file_status(self.path / "model.safetensors")[0] == "file":
            return ["model.safetensors"]  # before any index, as transformers' from_pretrained
        if file_status(index)[0] != "missing":
            data = read_json(index, "download the checkpoint again")
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(
                    f"{index} has no 'weight_map' mapping tensor names to files; download the checkpoint again"
                )
            where = f"{index.name}'s weight_map"
            files = sorted({confined_name(f, self.path, where) for f in weight_map.values()})
            for f in files:
                status, _ = file_status(self.path / f)
                if status == "missing":
                    raise CheckpointError(
                        f"{self.path} lacks shard {f} named in its index; the download is incomplete: "
                        + self.fetch_again()
                    )
                if status != "file":
                    raise CheckpointError(
                        f"shard {self.path / f} named in the index {describe(status)}; download it again"
                    )
            return files
        try:
            entries = sorted(self.path.iterdir())
        except OSError as e:
            raise CheckpointError(f"cannot list checkpoint directory {self.path} ({e.strerror})") from None
        files = [p.name for p in entries if p.suffix == ".safetensors"]
        for name in files:
            status, _ = file_status(self.path / name)
            if status != "file":
                raise CheckpointError(
                    f"{self.path / name} {describe(status)}; " + self.fetch_again("remove or replace it")
                )
        if files:
            return files
        if any(p.suffix in PICKLE_SUFFIXES for p in entries):
            raise CheckpointError(
                f"{self.path} holds only pickle weights (.bin/.pt); moespeq never unpickles. "
                "Convert it to safetensors (save_pretrained(..., safe_serialization=True)) or pull a safetensors revision"
            )
        from moespeq_cli.model_ref import snapshot_repo

        repo = snapshot_repo(self.path)
        if repo is not None:  # a pull with --config-only (`plan` is all it serves), or one cut short
            raise CheckpointError(
                f"the weights of {repo} are not downloaded (a pull with --config-only, which is enough for "
                f"`moespeq plan`, or one that did not finish); `moespeq pull {repo}` downloads them"
            )
        raise CheckpointError(f"{self.path} holds no .safetensors weights; download the checkpoint again")

    def fetch_again(self, otherwise: str | None = "download it again") -> str | None:
        """The remedy for a missing or broken weights file: the pull that fetches it, in a
        pulled repository; else ``otherwise``."""
        from moespeq_cli.model_ref import snapshot_repo

        repo = snapshot_repo(self.path)
        return f"`moespeq pull {repo}` fetches it" if repo is not None else otherwise

    def keys(self) -> list[str]:
        """The tensors of the files, by their names there (no alias counted twice)."""
        return [k for k in self._where if k not in self._real]

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(self._real.get(name, name)).get_shape())

    def _handle(self, name: str):
        if name not in self._where:
            raise CheckpointError(
                f"tensor {name} is missing from {self.path}; the checkpoint is incomplete or of another architecture"
                + (f" ({self.fetch_again()} if a pull was cut short)" if self.fetch_again(None) else "")
            )
        return self._files[self._where[name]]

    def _read(self, name: str, row: int | None = None) -> torch.Tensor:
        self._handle(name)  # a missing tensor said as such
        return self._data[self._where[name]].read(self._real.get(name, name), row)

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype of ``name`` ("BF16", "F32", "I64", ...), from the header."""
        return self._handle(name).get_slice(self._real.get(name, name)).get_dtype()

    def check_dtype(self, name: str) -> None:
        if self.dtype_name(name) not in FLOAT_DTYPES:
            raise CheckpointError(
                f"tensor {name} in {self.path} is {self.dtype_name(name)}, not a floating-point weight "
                f"({', '.join(FLOAT_DTYPES)}); the checkpoint is corrupt or quantized in a format moespeq does not read"
            )

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``name`` as stored, or in ``dtype``: a block-FP8 weight is then dequantized with
        its ``_scale_inv``."""
        self.check_dtype(name)
        t = self._read(name)
        if dtype is None:
            return t
        if self.dtype_name(name) == FP8_DTYPE:
            fmt = self.config.expert_format
            if fmt.quant != FP8 or t.dim() != 2 or not self.has(f"{name}_scale_inv"):
                raise CheckpointError(
                    f"tensor {name} in {self.path} is FP8 without a block scale ({name}_scale_inv) or an fp8 "
                    "quantization_config in config.json; the checkpoint is incomplete"
                )
            scale = self.tensor(f"{name}_scale_inv")
            (bm, bn), (rows, cols) = fmt.block, t.shape
            if tuple(scale.shape) != (-(-rows // bm), -(-cols // bn)) or not scale.is_floating_point():
                raise CheckpointError(
                    f"tensor {name}_scale_inv in {self.path} has shape {list(scale.shape)} ({scale.dtype}); "
                    f"FP8 blocks of {bm}x{bn} over {list(t.shape)} need [{-(-rows // bm)}, {-(-cols // bn)}] floats; "
                    "the checkpoint and its config disagree"
                )
            return fp8_dequantize(t, scale, fmt.block, dtype)
        return t.to(dtype)

    def expert(self, layer: int, expert: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        """One routed expert's parts as stored (expert_format.py; e.g. gate [I, H], up
        [I, H], down [H, I]), read on their own: of a fused tensor, only row ``expert``."""
        if not self.config.expert_format.fused:
            return tuple(self.tensor(k, dtype) for k in self.config.expert_keys(layer, expert))
        fmt = self.config.expert_format
        parts = []
        for k, want in zip(self.config.expert_keys(layer, expert), fmt.part_dtypes(self.config.dtype), strict=True):
            self.check_part_dtype(k, want)
            t = self._read(k, expert)
            parts.append(t if dtype is None or not want.is_floating_point else t.to(dtype))
        return tuple(parts)

    def check_part_dtype(self, name: str, want: torch.dtype) -> None:
        """A part of an expert in a float format may be any float dtype (every tier converts
        it); a compact format's parts (FP8 codes and scales, MXFP4's bytes and biases) must be
        exactly what the format lays out, since every tier holds them as stored."""
        if want == torch.float8_e4m3fn and self.dtype_name(name) != FP8_DTYPE:
            raise CheckpointError(
                f"tensor {name} in {self.path} is {self.dtype_name(name)}, but config.json's quantization_config says "
                "FP8 (e4m3); the checkpoint and its config disagree"
            )
        fmt = self.config.expert_format
        if fmt.compact and self.dtype_name(name) != STORED_NAMES.get(want):
            # every tier holds a compact expert's bytes as the format lays them out
            raise CheckpointError(
                f"tensor {name} in {self.path} is {self.dtype_name(name)}, but {fmt.quant} experts store it as "
                f"{STORED_NAMES.get(want)} (config.json's dtype {self.config.dtype}); the checkpoint and its config disagree"
            )
        if not fmt.compact:
            self.check_dtype(name)

    def check_experts(self) -> None:
        """Every routed expert present with the shapes the config implies (no data read)."""
        c = self.config
        fused = c.expert_format.fused
        dtypes = c.expert_format.part_dtypes(c.dtype)
        for layer in c.moe_layers:
            for e in range(1 if fused else c.num_experts):
                parts = zip(c.expert_keys(layer, e), c.expert_shapes(), dtypes, strict=True)
                for key, want, dtype in parts:
                    self.check_part_dtype(key, dtype)
                    got = self.shape(key)
                    want = (c.num_experts, *want) if fused else tuple(want)
                    if got != want:
                        raise CheckpointError(
                            f"tensor {key} has shape {list(got)} but config.json implies {list(want)}; "
                            "the checkpoint and its config disagree"
                        )
