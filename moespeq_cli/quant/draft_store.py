"""Where a draft lives and whether it fits a checkpoint: the storage side of the self-draft
(``quant/draft.py`` quantizes and computes).

A draft is a directory of two files, ``draft.safetensors`` and ``manifest.json`` (format,
version, method, block size, and the *fingerprint* of the checkpoint it was built from).
``run`` finds it by name (``default_draft_dir``: beside the checkpoint, or in moespeq's
cache where that is not writable or is a Hugging Face snapshot; the demo's ships in the
package), and ``draft_state`` says whether it is ready, stale (built from other weights)
or damaged.

Writing one never leaves a half-written or destroyed directory: one writer at a time
(``draft_lock``), a temporary directory beside the target (named with the writer's pid)
swapped in whole (``replace_dir``: an atomic exchange where the kernel can), and what a
killed writer left is finished or removed by the next (``recover``). A directory holding
anything but a draft's files is the user's and is never replaced (``check_out``).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from moespeq_cli.errors import CheckpointError, MoespeqError, UsageError
from moespeq_cli.fs import (
    cache_dir,
    check_name_length,
    exclusive_lock,
    file_status,
    is_dir,
    is_regular,
    pid_alive,
    shown,
)
from moespeq_cli.model_ref import snapshot_repo
from moespeq_cli.models.checkpoint import Checkpoint, read_json

METHODS = ("nf4", "fp4")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
FORMAT = "moespeq-draft"
FORMAT_VERSION = 1


def fingerprint(ckpt: Checkpoint) -> str:
    """A cheap identity of the source weights: config.json, each safetensors header, and
    16 samples of 4 KiB spread over each file (hashing 90 GB whole would take minutes).
    Computed once a checkpoint (a run asks for it to choose, check and load its draft)."""
    if ckpt.fingerprint is None:
        ckpt.fingerprint = _fingerprint(ckpt)
    return ckpt.fingerprint


def _fingerprint(ckpt: Checkpoint) -> str:
    h = hashlib.sha256((ckpt.path / "config.json").read_bytes())
    for name in sorted(ckpt._files):
        p = ckpt.path / name
        size = p.stat().st_size
        h.update(f"{name}:{size}".encode())
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(n))
            for i in range(16):
                f.seek(8 + n + (size - 8 - n) * i // 16)
                h.update(f.read(4096))
    return h.hexdigest()


# -- writing a draft safely -------------------------------------------------------------

TMP_PREFIX = ".{name}.tmp-"
OLD_PREFIX = ".{name}.old-"


def short_name(name: str) -> str:
    """``name``, or a shortened unique stand-in where a temporary name built from it would
    pass the file system's 255 bytes."""
    if len(os.fsencode(name)) <= 100:
        return name
    head = os.fsdecode(os.fsencode(name)[:80])  # a character cut in two stays bytes (surrogateescape)
    return f"{head}-{hashlib.sha256(os.fsencode(name)).hexdigest()[:12]}"


def stem(prefix: str, out: Path) -> str:
    """The start of a temporary directory's name for draft ``out``, with the writer's pid
    (``recover`` leaves a live writer's alone): ``.NAME.tmp-PID-``."""
    return f"{prefix.format(name=short_name(out.name))}{os.getpid()}-"


@contextlib.contextmanager
def draft_lock(out: Path, fp: str, stale_ok: bool = False):
    """The one writer of draft ``out``: creates its parent, takes ``.name.lock`` beside it,
    finishes what a killed writer left (``recover``) and checks ``out`` may be replaced
    (``check_out``; ``stale_ok``: ``out`` is the checkpoint's default draft path)."""
    out = real_out(out)
    check_out(out, fp, stale_ok)  # refuse before creating anything
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Can a draft be written here at all? (read-only, /proc, /sys)
        probe = None
        try:
            probe = tempfile.mkdtemp(prefix=stem(TMP_PREFIX, out), dir=out.parent)
        finally:  # (a signal right after it is made: removed all the same)
            if probe is not None:
                os.rmdir(probe)
    except OSError as e:
        # a given --out is the user's choice (usage, 2); the default place is this machine's (runtime, 1)
        named = f"the draft directory {shown(out)}" if stale_ok else f"--out {shown(out)}"
        error = MoespeqError if stale_ok else UsageError
        raise error(f"{named}: cannot write there ({e.strerror}); give another directory with --out") from None
    with exclusive_lock(lock_file(out), f"writing the draft {out}"):
        recover(out, fp)
        check_out(out, fp, stale_ok)
        yield out


def real_out(out: Path) -> Path:
    """``--out`` with a symlink followed: the draft replaces what the link points to, and
    the link stays. A dangling link is refused (it would create directories elsewhere)."""
    out = Path(out)
    check_name_length(out, "--out")
    if not out.is_symlink():
        return out
    if not os.path.exists(out):
        raise UsageError(f"--out {shown(out)} is a dangling symlink; give a new directory or fix the link")
    return Path(os.path.realpath(out))


def lock_file(out: Path) -> Path:
    """Where the lock of draft ``out`` lives: moespeq's cache (nothing added beside the
    user's files), or beside ``out`` when the cache cannot be written."""
    key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:16]
    locks = cache_dir() / "locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        if os.access(locks, os.W_OK):
            return locks / f"{key}.lock"
    except OSError:
        pass
    return Path(out).with_name(f".{short_name(Path(out).name)}.lock")


def is_draft_of(path: Path, fp: str) -> bool:
    """``path`` holds a moespeq draft built from the checkpoint with fingerprint ``fp``."""
    try:
        m = read_json(path / "manifest.json", "")
    except CheckpointError:
        return False
    return m.get("format") == FORMAT and m.get("source_fingerprint") == fp


def draft_state(path: Path, ckpt: Checkpoint) -> str:
    """What the saved draft in ``path`` is to ``ckpt``: "ready" (built from its weights),
    "stale" (from other weights: an edited or re-downloaded checkpoint) or "damaged" (no
    manifest, or its tensors' file cut short: ``load`` says so and how to rebuild it)."""
    from moespeq_cli.models.tensor_file import damage

    if not (path / "manifest.json").is_file() or damage(path / "draft.safetensors") is not None:
        return "damaged"
    return "ready" if is_draft_of(path, fingerprint(ckpt)) else "stale"


def stale_draft(path: Path, ckpt: Checkpoint) -> str | None:
    """A note when the saved draft in ``path`` is stale (``draft_state``), else None."""
    if draft_state(path, ckpt) != "stale":
        return None
    from moespeq_cli.model_ref import snapshot_repo

    model = snapshot_repo(ckpt.path) or str(ckpt.path)  # a pulled model by its id, not its snapshot's hash
    return (
        f"the saved draft in {path} was built from other weights than {model}'s: quantized again in memory "
        "for this run; `moespeq quantize` rebuilds it"
    )


def check_out(out: Path, fp: str, stale_ok: bool = False) -> None:
    """A draft may go to ``out`` only if nothing is there, an empty directory is, or a
    directory holding nothing but a draft's two files (``DRAFT_FILES``) is: a draft of the
    same checkpoint, a damaged one (its manifest unreadable), or, with ``stale_ok`` (the
    checkpoint's default draft path), a draft of its earlier weights. It is then
    replaced. Anything else is the user's: a directory with any other file (a checkpoint,
    notes beside a draft) is never replaced."""
    named = "the draft directory" if stale_ok else "--out"  # stale_ok: the default path, not a given --out
    # refusing to replace what is there is usage (2: another --out, or move it); an OS error
    # at the default place is this machine's (1), as in ``draft_lock``
    error = MoespeqError if stale_ok else UsageError
    status, _ = file_status(out)
    if status == "missing":
        return
    if status != "a directory":
        above = next((p for p in out.parents if os.path.lexists(p)), None)  # the nearest that exists
        if above is not None and file_status(above)[0] != "a directory":
            cache = " ($XDG_CACHE_HOME)" if str(above) == os.environ.get("XDG_CACHE_HOME") else ""
            raise UsageError(
                f"{named} {shown(out)} cannot be made: {shown(above)}{cache} is not a directory; "
                "give a directory with --out" + (", or point $XDG_CACHE_HOME at a directory" if cache else "")
            )
        what = "a file" if status == "file" else status if status.startswith("a ") else f"unusable ({status})"
        raise UsageError(f"{named} {shown(out)} exists and is {what}; give a new directory with --out")
    try:
        names = sorted(c.name for c in out.iterdir())
    except OSError as e:
        raise error(f"{named} {out} cannot be read ({e.strerror}); give a new directory with --out") from None
    others = [n for n in names if n not in DRAFT_FILES or not is_regular(out / n)]
    if others:
        listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UsageError(
            f"{named} {out} holds files that are not a moespeq draft's ({listed}); refusing to replace it "
            "(give a new directory with --out, or move them out)"
        )
    if "manifest.json" not in names or is_draft_of(out, fp):
        return  # nothing, or weights without a manifest: a damaged draft
    try:
        manifest = read_json(out / "manifest.json", "")
    except CheckpointError:
        return  # a damaged draft: nothing in it can be loaded
    if manifest.get("format") != FORMAT:
        raise UsageError(
            f"{named} {out} holds a manifest.json that is not a moespeq draft's; refusing to replace it "
            "(move the directory away or delete it yourself, or give a new directory with --out)"
        )
    if not stale_ok:
        raise UsageError(
            f"{named} {out} is a moespeq draft of another checkpoint; refusing to replace it "
            "(give a new directory with --out, or delete it yourself)"
        )


def recover(out: Path, fp: str) -> None:
    """Under the draft lock: finish what a killed ``quantize`` left. A draft set aside
    (``.name.old-PID``) while ``out`` is missing goes back; every other temporary
    directory of ``out`` is removed (its writer held the lock and is gone)."""
    parent = out.parent
    if not is_dir(parent):
        return
    for prefix in (OLD_PREFIX, TMP_PREFIX):
        start = prefix.format(name=short_name(out.name))
        for p in parent.glob(f"{glob.escape(start)}*"):
            pid = p.name[len(start) :].split("-", 1)[0]
            if pid.isdigit() and pid_alive(int(pid)):
                continue  # a writer still at work (another user's, under another lock)
            if not ours(p, finished=prefix == OLD_PREFIX):
                continue  # a directory of the user's that happens to share the name
            if prefix == OLD_PREFIX and not os.path.lexists(out) and is_draft_of(p, fp):
                os.replace(p, out)
                continue
            shutil.rmtree(p, ignore_errors=True)


DRAFT_FILES = {"draft.safetensors", "manifest.json"}
# safetensors writes a file under a temporary name first (".tmp" and six letters or
# digits, Rust's tempfile crate), renamed when complete: a kill mid-write leaves it
WRITER_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def ours(p: Path, finished: bool) -> bool:
    """A directory a killed ``quantize`` left: named by us (``.NAME.tmp-PID-...`` or
    ``.NAME.old-PID``), a real directory holding nothing but a draft's files (and, in a
    draft being written, the writer's temporary file), and, for a finished draft set
    aside, a moespeq manifest. Anything else is the user's."""
    if p.is_symlink() or not p.is_dir():
        return False
    try:
        names = {c.name for c in p.iterdir()}
    except OSError:
        return False
    known = {n for n in names if n in DRAFT_FILES or (not finished and WRITER_TEMP.fullmatch(n))}
    if known != names or any(not is_regular(p / n) for n in names):
        return False
    if finished:
        try:
            return read_json(p / "manifest.json", "").get("format") == FORMAT
        except CheckpointError:
            return False
    return True


def replace_dir(new: Path, out: Path) -> None:
    """Put directory ``new`` at ``out``. With ``out`` present, an atomic exchange
    (renameat2 RENAME_EXCHANGE, Linux) then removal of the old; where the kernel or the
    file system cannot exchange, the old is renamed aside first (``recover`` puts it
    back if a kill lands between the two renames)."""
    if not os.path.lexists(out):
        os.replace(new, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(new, out)
        return
    if _exchange(new, out):
        shutil.rmtree(new)  # now the old draft
        return
    old = Path(tempfile.mkdtemp(prefix=stem(OLD_PREFIX, out), dir=out.parent))
    os.replace(out, old)  # over the empty directory just made: a name nobody else holds
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


ASSETS = Path(__file__).resolve().parents[1] / "assets"  # the package's: the demo model and its draft


def bundled_draft(ckpt_path: Path, method: str, blocksize: int) -> Path | None:
    """The demo model's draft as shipped in the package (built by `moespeq quantize` with the
    defaults; checked against the demo by fingerprint when loaded), or None."""
    if not is_demo(ckpt_path):
        return None
    d = ASSETS / f"demo-draft-{method}-b{blocksize}"
    return d if (d / "manifest.json").is_file() else None


def saved_draft(ckpt_path: Path, method: str, blocksize: int) -> Path | None:
    """The draft ``moespeq run`` loads by default, if there is one: ``moespeq quantize``'s
    output (``default_draft_dir``), else the one shipped with the demo."""
    beside = Path(ckpt_path).resolve().with_name(draft_name(Path(ckpt_path).resolve(), method, blocksize))
    earlier = beside if snapshot_repo(Path(ckpt_path).resolve()) else None  # where earlier moespeq wrote it
    places = (default_draft_dir(ckpt_path, method, blocksize), earlier, bundled_draft(ckpt_path, method, blocksize))
    for d in places:
        if d is not None and (d / "manifest.json").is_file():
            return d
    # a draft directory without its manifest (quantize never leaves one: it renames a whole
    # draft in) is damaged: returned, ``load`` says so and how to rebuild it, rather than a
    # run quantizing again in memory without a word
    return next((d for d in places[:2] if d is not None and holds_draft_files(d)), None)


def holds_draft_files(d: Path) -> bool:
    """``d`` is a directory with a draft's file in it."""
    try:
        return is_dir(d) and bool(DRAFT_FILES & set(os.listdir(d)))
    except OSError:
        return False


def draft_options(ckpt: Checkpoint, method: str, blocksize: int) -> tuple[str, int]:
    """The (method, block size) of the draft ``run --draft auto`` loads for ``ckpt``: these,
    where a draft of them is saved or none of other options is; else those of the draft
    `moespeq quantize` saved last with other options (``quantize --method fp4 --blocksize
    128``) that this version loads and that was built from these weights. A draft of
    another version or of other weights is left where it is: it was not asked for. A saved
    default draft of other weights (stale) gives way to a draft of these with other
    options."""
    default = saved_draft(ckpt.path, method, blocksize)
    if default is not None and draft_state(default, ckpt) != "stale":
        return method, blocksize  # ready, or damaged: loading it says so
    found = []
    for d in drafts_of(ckpt.path):
        try:
            m = read_json(d / "manifest.json", "")
            when = (d / "manifest.json").stat().st_mtime
        except (CheckpointError, OSError):
            continue
        other = (m.get("method"), m.get("blocksize"))
        if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
            continue
        if other == (method, blocksize) or other[0] not in METHODS or other[1] not in BLOCKSIZES:
            continue
        if saved_draft(ckpt.path, *other) is None:
            continue
        if m.get("source_fingerprint") == fingerprint(ckpt):  # (computed once a checkpoint)
            found.append((when, *other))
    return max(found)[1:] if found else (method, blocksize)


def drafts_of(ckpt_path: Path) -> list[Path]:
    """Every draft directory moespeq keeps for the checkpoint, of any method and block
    size: beside it, in moespeq's cache, shipped with the demo (outputs must not replace
    their files)."""
    p = Path(ckpt_path).resolve()
    prefix = f"{p.name}.moespeq-draft-"
    places = [p.with_name(prefix), cached_draft(p, prefix)] + ([ASSETS / "demo-draft-"] if is_demo(p) else [])
    return [Path(d) for where in places for d in glob.glob(glob.escape(str(where)) + "*")]


def is_demo(ckpt_path: Path) -> bool:
    """The demo model inside the installed package."""
    return Path(ckpt_path).resolve() == (ASSETS / "demo").resolve()


def cached_draft(ckpt: Path, name: str) -> Path:
    """A draft's place in moespeq's cache: its name keyed by the checkpoint's resolved path."""
    return cache_dir() / "drafts" / f"{hashlib.sha256(str(ckpt).encode()).hexdigest()[:10]}-{name}"


def draft_name(ckpt_path: Path, method: str, blocksize: int) -> str:
    return f"{ckpt_path.name}.moespeq-draft-{method}-b{blocksize}"


def default_draft_dir(ckpt_path: Path, method: str, blocksize: int) -> Path:
    """Beside the checkpoint (<dir>.moespeq-draft-nf4-b64) when its parent is writable and
    it is neither the demo model inside the installed package nor a snapshot in the Hugging
    Face cache; otherwise in moespeq's cache ($XDG_CACHE_HOME/moespeq/drafts, default
    ~/.cache/moespeq/drafts)."""
    p = Path(ckpt_path).resolve()
    name = draft_name(p, method, blocksize)
    # nothing of moespeq's beside a hub snapshot, where the hub's tools would list it as a revision
    if os.access(p.parent, os.W_OK) and ASSETS.parent not in p.parents and snapshot_repo(p) is None:
        return p.with_name(name)
    return cached_draft(p, name)
