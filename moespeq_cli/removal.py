"""Removing models from this machine (``moespeq rm``).

A model ``moespeq pull`` fetched lives in the Hugging Face cache as ``models--ORG--NAME``
(its blobs, refs and a snapshot per revision), and the drafts ``moespeq quantize`` built
for it in moespeq's own cache, keyed by the snapshot's path (quant/draft_store.py).
Removing a model takes both, and nothing else: never the built-in demo (``rm demo``
removes only the drafts built of it), never a directory of the user's own (a path given
to ``run``, a ``pull --local-dir``: theirs to delete), never another repository's files.

Everything is checked before anything is deleted, for every model named: each name
resolves to a repository in the cache (an alias, a hub id, a path to its folder there;
rm removes nothing outside the cache, so a hub id is the cached model even where a
directory here has that name), the cache and the drafts' folder can be
changed, no download of it is in progress (huggingface_hub holds a lock per file under
``.locks`` while it writes one, and one per shared payload) and no ``quantize`` is
writing a draft of it (the lock of each place it writes one, quant/draft_store.py).
The drafts go first (one that cannot be deleted leaves the model, for ``rm`` again),
then the repository, through huggingface_hub's own cache API
(``delete_revisions(...).execute()``) over a view of the cache holding that repository
alone (revisions are found by commit hash, which a renamed or mirrored repository shares
with its original); the API also collects the payloads its cache shares between
repositories once nothing else links them. A repository the API cannot read (a folder
damaged, a removal cut short) is deleted whole. What huggingface_hub only logs or lets
through (a file it was not allowed to delete, a busy directory) is one error here,
naming what is left.

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
from moespeq_cli.fs import cache_dir, cannot_write_in, kind, shown
from moespeq_cli.model_ref import (
    ALIASES,
    DEMO,
    alias_of,
    check_hub_cache,
    check_named,
    hub_cache,
    looks_like_hub_id,
    repo_dir,
    repo_of,
)
from moespeq_cli.text import did_you_mean, printable


@dataclass
class Removal:
    """One model to remove: its repository's folder in the cache and its drafts."""

    name: str  # as the user typed it
    repo: str | None  # org/name (None: the built-in demo, whose drafts alone go)
    folder: Path | None  # <cache>/models--ORG--NAME
    size: int  # bytes its removal frees: the folder's files, and shared blobs only it links
    drafts: list[Path] = field(default_factory=list)  # in moespeq's cache
    draft_size: int = 0
    strategy: object | None = None  # huggingface_hub's DeleteCacheStrategy; None: deleted whole

    @property
    def freed(self) -> int:
        return self.size + self.draft_size


def plan_removals(models: list[str]) -> list[Removal]:
    """What removing each of ``models`` takes (a model named twice, once); a name that is
    not a model in the cache (a directory of the user's, a model not pulled) raises before
    anything is deleted, as does a cache moespeq may not change. The demo, built in, has
    only the drafts ``quantize`` kept for it to remove."""
    targets: dict[Path | None, str] = {}
    for model in models:
        try:
            folder = None if model == DEMO else repo_dir(repo_named(model)).absolute()
        except PermissionError as e:  # (a cache this user cannot search: ``chmod 000``)
            raise MoespeqError(
                f"the Hugging Face cache {shown(hub_cache())} cannot be read ({e.strerror.lower()}); check its permissions"
            ) from None
        targets.setdefault(folder, model)  # (named twice, or by an alias and its id: once)
    removals = []
    info = scan(hub_cache()) if any(f is not None for f in targets) else None
    for folder, model in targets.items():
        if folder is None:
            drafts = demo_drafts()
            if not drafts:
                raise UsageError("the demo is built into moespeq, and moespeq keeps no draft of it; nothing to remove")
            removals.append(Removal(model, None, None, 0, drafts, sum(files_size(d) for d in drafts)))
            continue
        strategy, shared = deletion(folder, info)
        drafts = drafts_of_repo(folder)
        removals.append(
            Removal(
                model,
                repo_of(folder.name),
                folder,
                files_size(folder) + shared,
                drafts,
                sum(files_size(d) for d in drafts),
                strategy,
            )
        )
    for where in {f.parent for f in targets if f is not None} | {d.parent for r in removals for d in r.drafts}:
        if why := cannot_write_in(where):
            raise MoespeqError(f"cannot remove anything from {shown(where)} ({why.lower()}); check its permissions")
    return removals


def demo_drafts() -> list[Path]:
    """The drafts ``quantize`` built of the demo in moespeq's cache (the one shipped with
    moespeq is part of it, and stays)."""
    from moespeq_cli.model_ref import DEMO_DIR
    from moespeq_cli.quant.draft_store import drafts_of

    ours = cache_dir() / "drafts"
    return sorted(d for d in drafts_of(DEMO_DIR) if d.parent == ours)


def said(model: str) -> str:
    """A name as typed, as a message may show it (no line break or escape reaches the terminal)."""
    return printable(model, 120)


def repo_named(model: str) -> str:
    """The hub id of the cached repository ``model`` names: an alias, a hub id (the cached
    model, even where a directory here has that name: rm removes nothing else), or a path
    into the cache (the repository's folder, one of its snapshots) or its folder's bare name
    (``models--ORG--NAME``, as ``ls`` of the cache and ``huggingface-cli scan-cache`` show it)."""
    check_named(model)
    repo = ALIASES[model][0] if model in ALIASES else model if looks_like_hub_id(model) else None
    if repo is None and "/" not in model and os.sep not in model:
        folder = repo_of(model)  # (not in the cache: refused below, with a suggestion)
        repo = folder if folder is not None and looks_like_hub_id(folder) else None
    cache = check_hub_cache()
    path = Path(os.path.expanduser(model))
    if (repo is None or not os.path.lexists(repo_dir(repo))) and kind(path) == "a directory":
        repo = cached_repo_at(path, cache)
        if repo is None and Path(os.path.realpath(path)).is_relative_to(os.path.realpath(cache)):
            raise UsageError(
                f"{shown(said(model))} is in the Hugging Face cache but no model's folder there; name the model "
                "(`moespeq list` shows them) or its models--ORG--NAME folder"
            )
        if repo is None:
            raise UsageError(
                f"{shown(said(model))} is a directory of yours, not a model in the Hugging Face cache; `moespeq rm` "
                "removes only models there (delete a directory of yours yourself)"
            )
    if repo is not None:
        folder = repo_dir(repo)
        if folder.is_symlink():
            raise MoespeqError(
                f"{said(model)}: its folder in the cache is a link ({shown(folder)} -> {shown(os.readlink(folder))}); "
                "remove the link or what it leads to yourself"
            )
        if folder.is_dir():
            return repo
        if os.path.lexists(folder):
            raise MoespeqError(f"{said(model)}: {shown(folder)} is not a folder; remove it yourself")
    cached = cached_repos(cache)
    names = cached + [a for r in cached if (a := alias_of(r))]
    which = said(model) if repo in (None, model) else f"{model} ({repo})"
    near = did_you_mean(repo if repo is not None and repo == repo_of(model) else model, names)  # (a folder: its id's)
    raise UnknownModelError(f"{which} is not on this machine{near}; `moespeq list` shows what is")


def cached_repo_at(path: Path, cache: Path) -> str | None:
    """The hub id whose cache folder ``path`` is or lies in (``models--ORG--NAME``, its
    snapshots), or None."""
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(cache))
    if not real.is_relative_to(root) or real == root:
        return None
    return repo_of(real.relative_to(root).parts[0])


def cached_repos(cache: Path) -> list[str]:
    try:
        return sorted(r for d in cache.iterdir() if (r := repo_of(d.name)) is not None)
    except OSError:
        return []


def scan(cache: Path):
    """huggingface_hub's view of the cache (every file looked at: once a command), or None
    where it cannot read it."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan_cache_dir(cache)
    except (CacheNotFound, OSError, ValueError):
        return None


def deletion(folder: Path, info) -> tuple[object | None, int]:
    """(huggingface_hub's strategy deleting every revision of the repository in ``folder``,
    the bytes of the cache's shared blob store it frees: payloads only this repository
    links), or (None, 0) where huggingface_hub cannot read the repository (it is then
    deleted whole). ``info``: ``scan``'s. The strategy is made from a view of the cache
    holding this repository alone: revisions are found by commit hash, which a renamed or
    mirrored repository shares with its original, whose snapshot would otherwise be
    deleted too."""
    import dataclasses

    if info is None:
        return None, 0
    real = Path(os.path.realpath(folder))
    repo = next((r for r in info.repos if Path(os.path.realpath(r.repo_path)) == real), None)
    if repo is None:
        return None, 0
    alone = dataclasses.replace(info, repos=frozenset({repo}))
    strategy = alone.delete_revisions(*(r.commit_hash for r in repo.revisions))
    touched = [*strategy.repos, *strategy.snapshots, *strategy.refs, *strategy.blobs]
    if any(not Path(os.path.realpath(p)).is_relative_to(real) for p in touched):  # (never, but never outside)
        return None, 0
    # the repository's own blob files are counted by ``files_size``; a file's first hop that
    # is a link leads into the shared store
    own = {f.blob_path: f.size_on_disk for rev in repo.revisions for f in rev.files if not f.blob_path.is_symlink()}
    return strategy, max(0, strategy.expected_freed_size - sum(own.values()))


def snapshots(folder: Path) -> list[Path]:
    try:
        return sorted(d for d in (folder / "snapshots").iterdir() if d.is_dir())
    except OSError:
        return []


def drafts_of_repo(folder: Path) -> list[Path]:
    """The drafts moespeq keeps in its cache for any snapshot of the repository in
    ``folder`` (those beside a snapshot, where earlier moespeq wrote them, go with it)."""
    from moespeq_cli.quant.draft_store import drafts_of

    ours = cache_dir() / "drafts"
    return sorted({d for s in snapshots(folder) for d in drafts_of(s) if d.parent == ours})


def draft_places(folder: Path) -> list[Path]:
    """Every draft ``quantize`` may be writing for a snapshot of the repository in
    ``folder`` without an ``--out`` (each method and block size), existing or not."""
    from moespeq_cli.quant.draft_store import BLOCKSIZES, METHODS, default_draft_dir

    return [default_draft_dir(s, m, b) for s in snapshots(folder) for m in METHODS for b in BLOCKSIZES]


def shared_locks(folder: Path) -> list[Path]:
    """The locks of the shared store's payloads the repository's blobs link to
    (huggingface_hub takes one, waiting as long as it takes, to collect a payload)."""
    store = Path(os.path.realpath(folder.parent / "blobs"))
    found = []
    with contextlib.suppress(OSError):
        for blob in (folder / "blobs").iterdir():
            if blob.is_symlink() and (target := Path(os.path.realpath(blob))).parent.parent == store:
                found.append(target.with_name(target.name + ".lock"))
    return found


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
    without waiting) and no draft of them being written (the lock of each place
    ``quantize`` writes one, a draft there or not); nothing holding a shared payload's
    lock either (looked at, not held: the deletion takes it)."""
    import fcntl

    from moespeq_cli.fs import exclusive_lock
    from moespeq_cli.quant.draft_store import lock_file

    def free(lock: Path, release: bool) -> bool:
        """Whether nothing holds ``lock`` (one that cannot be opened: another user's, whose
        holder cannot write this user's files either); kept held unless ``release``."""
        try:
            fd = os.open(lock, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            return e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN)
        if release:
            os.close(fd)
        else:
            held.callback(os.close, fd)
        return True

    with contextlib.ExitStack() as held:
        for r in removals:
            if r.folder is None:  # the demo: its drafts
                for d in r.drafts:
                    held.enter_context(exclusive_lock(lock_file(d), f"writing the draft {d}"))
                continue
            locks = check_hub_cache() / ".locks" / r.folder.name
            for lock in sorted(locks.glob("**/*.lock")) if locks.is_dir() else []:
                if not free(lock, release=False):
                    raise MoespeqError(
                        f"{said(r.name)} is being downloaded (a pull holds {shown(lock)}); "
                        "wait for it to finish or stop it, then remove the model"
                    )
            for lock in shared_locks(r.folder):
                if not free(lock, release=True):
                    raise MoespeqError(
                        f"{said(r.name)}: a file it shares with another model is in use (a pull holds "
                        f"{shown(lock)}); wait for it to finish, then remove the model"
                    )
            for d in draft_places(r.folder):
                held.enter_context(exclusive_lock(lock_file(d), f"writing the draft {d}"))
        yield


def remove(r: Removal) -> None:
    """Delete ``r``'s drafts, then its repository (a draft that cannot be deleted leaves
    the model there, for ``rm`` again); -> raises naming what could not be deleted."""
    for d in r.drafts:
        if os.path.lexists(d):
            delete_tree(d, r.name)
    if r.strategy is not None:
        import logging

        hub_log = logging.getLogger("huggingface_hub")
        quiet = hub_log.level
        hub_log.setLevel(logging.ERROR)  # (what it could not delete is said below, once)
        try:
            r.strategy.execute()
        except OSError:  # (it lets through all but a missing file and a refusal: EBUSY, EROFS, EIO)
            pass
        finally:
            hub_log.setLevel(quiet)
    if r.folder is not None and os.path.lexists(r.folder):  # (not read by the hub's API, or a file it only logged)
        delete_tree(r.folder, r.name)


def delete_tree(path: Path, name: str) -> None:
    def failed(_fn, where, exc):
        why = (getattr(exc, "strerror", None) or str(exc)).lower()
        raise MoespeqError(
            f"{said(name)}: could not delete {shown(where)} ({why}); the rest of {shown(path)} is left: "
            "check its permissions, then run `moespeq rm` again"
        ) from None

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=failed)
    else:
        shutil.rmtree(path, onerror=lambda fn, where, info: failed(fn, where, info[1]))
