"""What this machine can run without the network (``moespeq list``).

The built-in demo, and every model in the Hugging Face cache (where ``moespeq pull`` and
other tools put them) whose config.json names an architecture moespeq implements: the
name to type, its family, its size on disk, whether its weights are there or only its
config (``pull --config-only``, enough for ``plan``), and the drafts moespeq keeps for it
(``moespeq quantize``'s output, wherever ``run`` would look for one): which one ``run``
loads, and whether it still matches the weights (``run_draft``).

Nothing here writes or downloads. The cache's layout is read directly
(``models--ORG--NAME/{blobs,refs,snapshots}``), and each repository's snapshot is the one
``run`` resolves its name to (``model_ref.cached_snapshot``), so every name listed is a
name ``run`` and ``plan`` take. (``huggingface_hub.scan_cache_dir`` leaves out a whole
repository for one dangling link, which ``run`` then names precisely; here it is listed.)
Checkpoints in the user's own directories are not tracked anywhere, so they are not
listed: ``run`` takes their path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from moespeq_cli.errors import CheckpointError, MoespeqError
from moespeq_cli.model_ref import (
    DEMO,
    DEMO_DIR,
    alias_of,
    cached_snapshot,
    check_hub_cache,
    looks_like_hub_id,
    repo_of,
    unreadable_repo,
)


@dataclass(frozen=True)
class LocalModel:
    name: str  # what to type: "demo", an alias, or the hub id
    repo: str | None  # the hub id; None for the demo
    model_type: str
    path: Path  # the snapshot a run loads
    size: int  # bytes on disk (every revision the cache holds)
    weights: bool  # every weights file is there, whole (False: config only, a pull cut short, damaged)
    incomplete: bool  # some weights files are there, not all (the index names others, or a link dangles)
    damaged: str | None  # why a weights file that is there cannot be run, with the remedy ("truncated: pull again")
    drafts: tuple[Path, ...]  # every draft kept for it, of any options
    draft: Path | None  # the one `run --draft auto` loads
    draft_state: str | None  # "ready", "stale" (of other weights: run quantizes in memory instead), "damaged"
    draft_size: int  # of ``draft``
    modified: float  # seconds since the epoch


def local_models() -> tuple[list[LocalModel], list[tuple[str, str]]]:
    """-> (the models moespeq can run or plan, demo first then by name; the other model
    repositories in the cache, each with why it is not listed)."""
    cache = check_hub_cache()
    demo, _ = _entry(DEMO, None, DEMO_DIR, tree_size(DEMO_DIR), DEMO_DIR.stat().st_mtime)
    found, others = [], []
    try:
        folders = sorted(d for d in cache.iterdir() if d.name.startswith("models--"))
    except OSError:
        folders = []
    repos = []
    for d in folders:
        repo = repo_of(d.name)
        if repo is None:  # `models--gpt2`: a model without an organization (the hub's oldest)
            others.append((d.name, "not a model `run` takes: its hub id has no organization (org/name)"))
        elif not d.is_dir():  # a link to nothing, or to itself
            others.append((repo, "its folder in the cache is a link that leads to no folder"))
        else:
            repos.append((repo, d))
    for repo, d in repos:
        if not looks_like_hub_id(repo):  # (`models--..--x`, a space, a letter the hub refuses)
            others.append((repo, "not a hub id `run` takes"))
            continue
        snapshot = cached_snapshot(repo)  # what `run` resolves the name to
        if snapshot is None:
            if why := unreadable_repo(repo):
                others.append((repo, why))
            elif any((d / "snapshots").glob("*")):  # a --local-dir pull leaves refs/ alone: nothing to say
                others.append((repo, "no snapshot with a config.json"))
            continue
        size = tree_size(d / "blobs") or tree_size(snapshot)
        entry, why = _entry(alias_of(repo) or repo, repo, snapshot, size, snapshot.stat().st_mtime)
        if entry is None:
            others.append((repo, why))
        else:
            found.append(entry)
    return [demo, *sorted(found, key=lambda m: m.name.lower())], others


def _entry(name: str, repo: str | None, snapshot: Path, size: int, modified: float) -> tuple[LocalModel | None, str]:
    """-> (the model in ``snapshot``, "") or (None, why it is not one moespeq runs)."""
    from moespeq_cli.models import family
    from moespeq_cli.models.checkpoint import read_config
    from moespeq_cli.quant.draft_store import drafts_of

    try:  # as every checkpoint's config is read: a regular file, bounded in size
        raw = read_config(snapshot)
    except CheckpointError:
        return None, "its config.json cannot be read"
    model_type = raw.get("model_type")
    if family(model_type) is None:
        return None, f"model_type {model_type!r} is not an architecture moespeq runs"
    drafts = tuple(sorted(d for d in drafts_of(snapshot) if (d / "manifest.json").is_file()))
    held, incomplete = weight_files(snapshot)
    damaged = damaged_weights(snapshot) if held and not incomplete else None
    if held and not incomplete and damaged is None:
        try:
            damaged = unopened(snapshot)
        except MoespeqError as e:  # a checkpoint moespeq does not run (a GPTQ or AWQ quantization)
            return None, str(e)
    weights = held and not incomplete and damaged is None
    draft, state = run_draft(snapshot) if weights else (None, None)
    model = LocalModel(
        name=name,
        repo=repo,
        model_type=model_type,
        path=snapshot,
        size=size,
        weights=weights,
        incomplete=incomplete,
        damaged=damaged,
        drafts=drafts,
        draft=draft,
        draft_state=state,
        draft_size=tree_size(draft) if draft is not None else 0,
        modified=modified,
    )
    return model, ""


def unopened(snapshot: Path) -> str | None:
    """Why ``run`` cannot open the checkpoint in ``snapshot`` though its weights files are
    whole (a damaged index, a header safetensors refuses, a tokenizer or generation
    config missing or damaged), or None; a checkpoint moespeq does not run at all raises
    (``UnsupportedModelError``: not a damaged one)."""
    try:
        why = open_problem(snapshot, tokenizer=False)
    except OSError as e:
        return f"cannot be opened ({(e.strerror or 'error').lower()})"
    return "cannot be opened: pull again (`moespeq run` says why)" if why is not None else None


def open_problem(snapshot: Path, tokenizer: bool = True) -> CheckpointError | None:
    """What ``run`` says opening the checkpoint in ``snapshot`` (its config, index,
    weights' headers, tokenizer and generation config), or None where it opens. Without
    ``tokenizer`` (``list``, over every model: a tokenizer of tens of MB takes tenths of
    a second to build) its tokenizer.json need only be a file with something in it."""
    from moespeq_cli.fs import file_status
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.tokenizer import Tokenizer

    try:
        ckpt = Checkpoint(snapshot)
        if tokenizer:
            Tokenizer(snapshot, ckpt.raw_config)
        else:
            status, size = file_status(snapshot / "tokenizer.json")
            if status != "file" or size == 0:
                return CheckpointError(f"{snapshot} has no usable tokenizer.json")
    except CheckpointError as e:
        return e
    return None


def run_draft(snapshot: Path) -> tuple[Path | None, str | None]:
    """The draft ``run --draft auto`` loads for the checkpoint in ``snapshot`` (of the
    default options, else the one `quantize` saved last with others: quant/draft_store.py
    ``draft_options``) and its state (quant/draft_store.py ``draft_state``: "ready", "stale" --
    ``run`` quantizes again in memory until `quantize` rebuilds it -- or "damaged").
    (None, None) without one, or where the checkpoint cannot be read (``run`` says why)."""
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.quant.draft_store import draft_options, draft_state, saved_draft
    from moespeq_cli.runtime.engine import EngineOptions

    try:
        ckpt = Checkpoint(snapshot)
        if ckpt.config.expert_format.four_bit:
            return None, None  # experts stored in 4 bits: run builds no draft of them
        draft = saved_draft(snapshot, *draft_options(ckpt, EngineOptions.quant_method, EngineOptions.blocksize))
        return (draft, draft_state(draft, ckpt)) if draft is not None else (None, None)
    except (MoespeqError, OSError):
        return None, None


def weight_files(snapshot: Path) -> tuple[bool, bool]:
    """(whether ``snapshot`` holds weights, whether some that its index names are missing:
    a pull cut short between shards, or a link to a blob that is gone)."""
    from moespeq_cli.models.checkpoint import read_json

    files = list(snapshot.glob("*.safetensors"))
    held = any(os.path.lexists(p) for p in files)
    if any(os.path.lexists(p) and not p.exists() for p in files):  # (a dangling link, a loop)
        return held, True
    if (snapshot / "model.safetensors").exists():
        return True, False  # read before any index, as a run reads it (models/checkpoint.py)
    try:
        shards = set(read_json(snapshot / "model.safetensors.index.json", "").get("weight_map", {}).values())
    except (CheckpointError, AttributeError, TypeError):
        shards = set()
    # a pull cut short before the index arrived: the shards' names say how many there are
    for f in snapshot.glob("*-of-*.safetensors"):
        m = re.fullmatch(r"(.*)-(\d+)-of-(\d+)\.safetensors", f.name)
        if m:
            width, total = len(m.group(2)), int(m.group(3))
            names = (f"{m.group(1)}-{i:0{width}d}-of-{m.group(3)}.safetensors" for i in range(1, total + 1))
            shards |= set(names)
    missing = any(not (snapshot / str(s)).exists() for s in shards)
    return held, held and missing


def damaged_weights(snapshot: Path) -> str | None:
    """Why a weights file of ``snapshot`` cannot be run (None: each is whole): one its
    user cannot read, or whose safetensors header is broken or names more bytes than the
    file holds (a copy cut short). Only the headers are read: ``run`` would say the same
    when it opens them."""
    found = next(damaged_files(snapshot), None)
    return found[1] if found else None


def damaged_files(snapshot: Path):
    """(name, why) for each weights file of ``snapshot`` that cannot be run, in name order
    (``damaged_weights``); a pull downloads those named "pull again" afresh."""
    from moespeq_cli.models.tensor_file import damage

    for p in sorted(snapshot.glob("*.safetensors")):
        what = damage(p)
        if what is None:
            continue
        if what == "unreadable":
            yield p.name, f"{p.name} unreadable: check its permissions"
        elif what.startswith(("truncated", "damaged")):
            yield p.name, f"{p.name} {what}: pull again"
        else:
            yield p.name, f"{p.name} cannot be read ({what}): check it"


def tree_size(path: Path) -> int:
    """Bytes of the files under ``path`` (links followed, as the cache's snapshots are;
    dangling ones count nothing; nor does a partial download, ``*.incomplete``)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            if f.endswith(".incomplete"):
                continue
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total
