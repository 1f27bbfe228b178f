"""Removing models from this machine (``moespeq rm``).

A model ``moespeq pull`` fetched lives in the Hugging Face cache as ``models--ORG--NAME``
(its blobs, refs and a snapshot per revision), and the drafts ``moespeq quantize`` built
for it in moespeq's own cache, keyed by the snapshot's path (quant/draft_store.py).
Removing a model takes both, and nothing else: never the built-in demo, never a
directory of the user's own (a path given to ``run``, a ``pull --local-dir``: theirs to
delete), never another repository's files.

Everything is checked before anything is deleted, for every model named: each name
resolves to a repository in the cache (an alias, a hub id), no download of it is in
progress (huggingface_hub holds a lock per file under ``.locks`` while it writes one) and
no ``quantize`` is writing one of its drafts (the draft's lock, quant/draft_store.py).
The repository is then deleted through huggingface_hub's own cache API
(``scan_cache_dir().delete_revisions(...)``), which also collects the blobs its cache
shares between repositories once nothing else links them; a repository that API cannot
read (a folder damaged, a removal cut short) is deleted whole. What huggingface_hub only
logs (a file it was not allowed to delete) is an error here, naming what is left.

A run or a server that has the model open keeps reading its open files until it exits
(the disk tier reads through the descriptors it holds); the space returns then.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from moespeq_cli.errors import MoespeqError, UnknownModelError, UsageError
from moespeq_cli.fs import cache_dir, kind, shown
from moespeq_cli.model_ref import (
    ALIASES,
    DEMO,
    alias_of,
    check_hub_cache,
    check_named,
    looks_like_hub_id,
    repo_dir,
    repo_of,
)
from moespeq_cli.text import did_you_mean


@dataclass
class Removal:
    """One model to remove: its repository's folder in the cache and its drafts."""

    name: str  # as the user typed it
    repo: str  # org/name
    folder: Path  # <cache>/models--ORG--NAME
    size: int  # bytes its removal frees: the folder's files, and shared blobs only it links
    drafts: list[Path] = field(default_factory=list)  # in moespeq's cache
    draft_size: int = 0
    strategy: object | None = None  # huggingface_hub's DeleteCacheStrategy; None: deleted whole

    @property
    def freed(self) -> int:
        return self.size + self.draft_size


def plan_removals(models: list[str]) -> list[Removal]:
    """What removing each of ``models`` takes; a name that is not a model in the cache
    (the demo, a directory of the user's, a model not pulled) raises before anything is
    deleted, as does a model named twice."""
    targets: dict[Path, str] = {}
    for model in models:
        repo = repo_named(model)
        folder = repo_dir(repo)
        if folder in targets:
            raise UsageError(f"{model!r} names the same model as {targets[folder]!r}; give it once")
        targets[folder] = model
    scanned = scan_cache()
    removals = []
    for folder, model in targets.items():
        repo = repo_of(folder.name)
        strategy = scanned.get(folder)
        size = files_size(folder) + (shared_size(strategy, folder) if strategy is not None else 0)
        drafts = drafts_of_repo(folder)
        removals.append(Removal(model, repo, folder, size, drafts, sum(files_size(d) for d in drafts), strategy))
    return removals


def repo_named(model: str) -> str:
    """The hub id of the cached repository ``model`` names (an alias or a hub id)."""
    check_named(model)
    if model == DEMO:
        raise UsageError("the demo is built into moespeq; there is nothing to remove")
    repo = ALIASES[model][0] if model in ALIASES else model if looks_like_hub_id(model) else None
    cache = check_hub_cache()
    if repo is not None:
        folder = repo_dir(repo)
        if folder.is_symlink():
            raise MoespeqError(
                f"{model}: its folder in the cache is a link ({shown(folder)} -> {os.readlink(folder)}); "
                "remove the link or what it leads to yourself"
            )
        if os.path.lexists(folder):
            return repo
    if kind(Path(os.path.expanduser(model))) == "a directory":
        raise UsageError(
            f"{shown(model)} is a directory of yours, not a model in the Hugging Face cache; "
            "`moespeq rm` removes only what `moespeq list` shows: delete the directory yourself"
        )
    cached = cached_repos(cache)
    names = cached + [a for r in cached if (a := alias_of(r))]
    which = model if repo in (None, model) else f"{model} ({repo})"
    raise UnknownModelError(f"{which} is not on this machine{did_you_mean(model, names)}; `moespeq list` shows what is")


def cached_repos(cache: Path) -> list[str]:
    try:
        return sorted(r for d in cache.iterdir() if (r := repo_of(d.name)) is not None)
    except OSError:
        return []


def scan_cache() -> dict[Path, object]:
    """{repository folder: the strategy deleting every revision of it} for each repository
    huggingface_hub can read in the cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(check_hub_cache())
    except (CacheNotFound, OSError, ValueError):
        return {}
    return {repo.repo_path: info.delete_revisions(*(r.commit_hash for r in repo.revisions)) for repo in info.repos}


def shared_size(strategy, folder: Path) -> int:
    """Bytes of the cache's shared blob store that deleting the repository in ``folder``
    frees (payloads only it links): what huggingface_hub expects to free beyond the
    repository's own blob files."""
    return max(0, strategy.expected_freed_size - files_size(folder / "blobs"))


def drafts_of_repo(folder: Path) -> list[Path]:
    """The drafts moespeq keeps in its cache for any snapshot of the repository in
    ``folder`` (those beside a snapshot, where earlier moespeq wrote them, go with it)."""
    from moespeq_cli.quant.draft_store import drafts_of

    ours = cache_dir() / "drafts"
    try:
        snapshots = [d for d in (folder / "snapshots").iterdir() if d.is_dir()]
    except OSError:
        return []
    found = {d for s in snapshots for d in drafts_of(s) if d.parent == ours}
    return sorted(found)


def files_size(path: Path) -> int:
    """Bytes of the regular files under ``path``, links not followed: what deleting it frees."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, f))
                total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


@contextlib.contextmanager
def nothing_writing(removals: list[Removal]):
    """Held while the models are removed: no download of any of them in progress (each
    lock huggingface_hub takes while writing one of the repository's files, taken here
    without waiting) and no draft of them being written (each draft's own lock)."""
    import fcntl

    from moespeq_cli.fs import exclusive_lock
    from moespeq_cli.quant.draft_store import lock_file

    with contextlib.ExitStack() as held:
        for r in removals:
            locks = check_hub_cache() / ".locks" / r.folder.name
            for lock in sorted(locks.glob("**/*.lock")) if locks.is_dir() else []:
                try:
                    fd = os.open(lock, os.O_RDWR)
                except OSError:
                    continue  # (another user's: its download cannot write our files either)
                held.callback(os.close, fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        continue
                    raise MoespeqError(
                        f"{r.name} is being downloaded (a pull holds {shown(lock)}); "
                        "wait for it to finish or stop it, then remove the model"
                    ) from None
            for d in r.drafts:
                held.enter_context(exclusive_lock(lock_file(d), f"writing the draft {d}"))
        yield


def remove(r: Removal) -> None:
    """Delete ``r``'s repository and drafts; -> raises naming what could not be deleted."""
    if r.strategy is not None:
        import logging

        hub_log = logging.getLogger("huggingface_hub")
        quiet = hub_log.level
        hub_log.setLevel(logging.ERROR)  # (what it could not delete is said below, once)
        try:
            r.strategy.execute()
        finally:
            hub_log.setLevel(quiet)
    for path in [r.folder, *r.drafts]:
        if os.path.lexists(path):  # (not read by the hub's API, or a file it only logged)
            delete_tree(path, r.name)


def delete_tree(path: Path, name: str) -> None:
    def failed(_fn, where, exc):
        why = (getattr(exc, "strerror", None) or str(exc)).lower()
        raise MoespeqError(
            f"{name}: could not delete {shown(where)} ({why}); the rest of {shown(path)} is left: "
            "check its permissions, then run `moespeq rm` again"
        ) from None

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=failed)
    else:
        shutil.rmtree(path, onerror=lambda fn, where, info: failed(fn, where, info[1]))
