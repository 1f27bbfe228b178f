"""What this machine can run without the network (``moespeq list``).

The built-in demo, and every model in the Hugging Face cache (where ``moespeq pull`` and
other tools put them) whose config.json names an architecture moespeq implements: the
name to type, its family, its size on disk, whether its weights are there or only its
config (``pull --config-only``, enough for ``plan``), and the drafts moespeq keeps for it
(``moespeq quantize``'s output, wherever ``run`` would look for one).

Nothing here writes or downloads: it reads the cache's directory tree
(``huggingface_hub.scan_cache_dir``) and each snapshot's config.json. Checkpoints in the
user's own directories are not tracked anywhere, so they are not listed: ``run`` takes
their path.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from moespeq_cli.errors import MoespeqError
from moespeq_cli.model_ref import ALIASES, DEMO, DEMO_DIR, cached_snapshot


@dataclass(frozen=True)
class LocalModel:
    name: str  # what to type: "demo", an alias, or the hub id
    repo: str | None  # the hub id; None for the demo
    model_type: str
    path: Path  # the snapshot a run loads
    size: int  # bytes on disk (every revision the cache holds)
    weights: bool  # False: config only
    drafts: tuple[Path, ...]
    draft_size: int
    modified: float  # seconds since the epoch


def local_models() -> tuple[list[LocalModel], list[str]]:
    """-> (the models moespeq can run or plan, demo first then by name; the hub ids of the
    other model repositories in the cache, which moespeq does not run)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    models = [_entry(DEMO, None, DEMO_DIR, _tree_size(DEMO_DIR), DEMO_DIR.stat().st_mtime)]
    others = []
    where = os.environ.get("HF_HUB_CACHE") or None
    try:
        repos = scan_cache_dir(where).repos
    except CacheNotFound:
        repos = frozenset()
    except ValueError:  # the cache's path is a file
        from huggingface_hub import constants

        shown = where or constants.HF_HUB_CACHE
        raise MoespeqError(f"the Hugging Face cache {shown} is not a directory; point HF_HUB_CACHE at one") from None
    names = {repo: alias for alias, (repo, _) in reversed(ALIASES.items())}  # the first alias wins
    found = []
    for repo in repos:
        if repo.repo_type != "model":
            continue
        snapshot = cached_snapshot(repo.repo_id)  # what `run` resolves the name to
        entry = snapshot and _entry(
            names.get(repo.repo_id, repo.repo_id), repo.repo_id, snapshot, repo.size_on_disk, repo.last_modified
        )
        if entry:
            found.append(entry)
        else:
            others.append(repo.repo_id)
    return models + sorted(found, key=lambda m: m.name.lower()), sorted(others)


def _entry(name: str, repo: str | None, snapshot: Path, size: int, modified: float) -> LocalModel | None:
    """The model in ``snapshot``, or None where its config.json is missing, unreadable or
    names an architecture moespeq does not implement."""
    from moespeq_cli.models import ARCHITECTURES, TYPE_ALIASES
    from moespeq_cli.quant.draft import drafts_of

    try:
        raw = json.loads((snapshot / "config.json").read_text())
    except (OSError, ValueError):
        return None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str) or TYPE_ALIASES.get(model_type, model_type) not in ARCHITECTURES:
        return None
    drafts = tuple(sorted(d for d in drafts_of(snapshot) if (d / "manifest.json").is_file()))
    return LocalModel(
        name=name,
        repo=repo,
        model_type=model_type,
        path=snapshot,
        size=size,
        weights=any(snapshot.glob("*.safetensors")),
        drafts=drafts,
        draft_size=sum(_tree_size(d) for d in drafts),
        modified=modified,
    )


def _tree_size(path: Path) -> int:
    """Bytes of the files under ``path`` (links followed, as the cache's snapshots are)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total
