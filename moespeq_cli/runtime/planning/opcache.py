"""Op counts of a forward pass, remembered across runs.

``StepModel.pass_ops`` counts the ops a forward pass dispatches by running the model on
the meta device (planning/estimate.py ``count_pass_ops``). The first such run in a
process pays for torch's Python meta kernels, which import ``torch._dynamo`` and sympy:
about a second on a 2-core machine (1.0 s of the demo's 2.6-3.8 s to its first token,
measured with ``python -X importtime``), before the first token of every run whose plan
weighs the draft that way. A count depends only on the model's structure, the code the
pass runs through and torch's release, so it is kept in moespeq's cache
(``op-counts.json``) under a digest of all three: a change to any of them (a model file
edited, another torch) counts afresh, and a cache that cannot be read or written only
means counting again.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

KEEP = 256  # counts kept (the oldest dropped first): a few per model ever planned
# the code a counted pass runs through: the models, the executors (grouping, op counting)
# and the counting itself
SOURCES = ("models", "runtime/executors", "runtime/planning/estimate.py")


@functools.cache
def source_digest() -> str:
    """A digest of the code a counted pass runs (``SOURCES``, every .py file in order)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for source in SOURCES:
        path = root / source
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def count_key(model: torch.nn.Module, cfg: object, tokens: int, grouped: bool) -> str:
    """What a count depends on: torch's release, the code, the model's structure (its
    modules' repr, the parsed config and the raw one -- a sliding window or a soft cap
    shows in neither the modules nor the parsed fields --, the context it was built for)
    and the pass."""
    parts = (
        torch.__version__,
        source_digest(),
        repr(cfg),
        json.dumps(getattr(cfg, "raw", None), sort_keys=True, default=str),
        str(model),
        str(sum(getattr(m, "fused_qkv", None) is not None for m in model.modules())),  # fused attentions
        str(getattr(model, "context", 0)),
        str(tokens),
        str(grouped),
    )
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_file() -> Path:
    from moespeq_cli.fs import cache_dir

    return cache_dir() / "op-counts.json"


def remembered(key: str, count: Callable[[], int | None]) -> int | None:
    """The count stored under ``key``, else ``count()`` (stored when it is a number)."""
    from moespeq_cli.errors import MoespeqError
    from moespeq_cli.fs import atomic_write_text, read_text

    path = cache_file()
    try:
        table = json.loads(read_text(path, 16 * 2**20, "the op counts"))  # a regular file only: never a FIFO's wait
        table = table if isinstance(table, dict) else {}
    except (OSError, ValueError, MoespeqError):
        table = {}
    found = table.get(key)
    if isinstance(found, int) and not isinstance(found, bool) and found >= 0:
        return found
    n = count()
    if n is None:
        return None
    table.pop(key, None)
    table[key] = n
    for old in list(table)[: max(0, len(table) - KEEP)]:
        del table[old]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(table))
    except (OSError, MoespeqError):
        pass  # a read-only cache, or not a file there: the next run counts again
    return n
