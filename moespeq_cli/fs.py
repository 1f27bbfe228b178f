"""Every file moespeq reads or writes goes through here, so that hostile or unlucky paths
fail the same way everywhere (docs/security.md).

Reading: a file is checked to be a *regular* file before it is opened (a FIFO would
block forever, ``/dev/zero`` never ends, a directory or a symlink loop is an OS error),
it is opened non-blocking as a second guard, and it is read with a size bound. Names
that a checkpoint's index or config gives are confined to the checkpoint directory
*lexically* (no absolute path, no ``..``): symlinks the directory itself holds are the
directory's business, which keeps the Hugging Face cache (snapshots are symlinks into
``../../blobs``) working.

Writing: outputs are regular files only (``--trace /dev/null`` must not replace the
device node), never one of the run's own inputs, written to a temporary file beside the
target and renamed over it, so a kill at any instant leaves the old file or the new one,
never half of one. A replaced file keeps its mode; a new one gets the umask's. A
temporary file carries its writer's pid, so the next write of the same target removes
what a killed writer left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from moespeq_cli.errors import CheckpointError, MoespeqError, UsageError

MiB = 2**20


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def file_status(path: Path) -> tuple[str, int]:
    """('missing' | 'file' | what else it is, size): follows symlinks, never raises."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        try:
            os.lstat(path)
            return "a dangling symlink", 0
        except OSError:
            return "missing", 0
    except OSError as e:  # ELOOP (a symlink loop), ENOTDIR, EACCES, ENAMETOOLONG
        return (e.strerror or "unreadable").lower(), 0
    if stat.S_ISREG(st.st_mode):
        return "file", st.st_size
    return _kind(st.st_mode), 0


def kind(path: Path) -> str:
    """'missing', 'file', 'a directory', 'a FIFO', ... or why it cannot be looked at."""
    return file_status(path)[0]


def is_dir(path: Path) -> bool:
    """Path.is_dir that never raises (a name too long, a loop): those are not directories."""
    return kind(path) == "a directory"


def shown(path) -> str:
    """A path for an error line: long ones are cut in the middle."""
    s = str(path)
    return s if len(s) <= 160 else f"{s[:70]}...{s[-70:]}"


def describe(status: str) -> str:
    """'is a FIFO, not a regular file' or 'cannot be read (file name too long)'."""
    if status.startswith("a ") or status == "not a regular file":
        return f"is {status}" + ("" if status == "not a regular file" else ", not a regular file")
    return f"cannot be read ({status})"


def is_regular(path: Path) -> bool:
    return file_status(path)[0] == "file"


def read_bytes(
    path: Path,
    limit: int,
    what: str,
    error: type[MoespeqError] = CheckpointError,
    remedy: str = "give the path of a file",
) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them; anything else
    (missing, a FIFO, a device, a directory, too large) is ``error`` naming ``what``, and
    one that is not a file ends with ``remedy``."""
    status, size = file_status(path)
    name = shown(path)
    if status == "missing":
        raise error(f"{what} {name} does not exist; check the path")
    if status != "file":
        raise error(f"{what} {name} {describe(status)}; {remedy}")
    if size > limit:
        raise error(f"{what} {name} is {size / MiB:.1f} MiB, more than the {limit // MiB} MiB limit")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"cannot open {what} {path} ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the check and the open
            raise error(f"{what} {path} is not a regular file")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(limit + 1 - total, 8 * MiB))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise error(f"{what} {path} is larger than the {limit // MiB} MiB limit")
        return b"".join(chunks)
    except OSError as e:
        raise error(f"cannot read {what} {path} ({e.strerror})") from None
    finally:
        os.close(fd)


def read_text(path: Path, limit: int, what: str, error: type[MoespeqError] = CheckpointError, **named) -> str:
    """``read_bytes`` (the same arguments: ``remedy`` too), decoded as UTF-8."""
    data = read_bytes(path, limit, what, error, **named)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start}); fix or replace the file") from None


def confined_name(name: object, root: Path, where: str) -> str:
    """``name`` as a relative path inside ``root``, checked lexically: an absolute path,
    a ``..`` component, an empty or non-string name is a corrupt ``where``."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{where} names {name!r}, which is not a file name; the checkpoint is corrupt")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts or "\\" in name:
        raise CheckpointError(
            f"{where} names {name!r}, a path outside {root}; the checkpoint is corrupt (files must be inside it)"
        )
    return name


# -- writing -----------------------------------------------------------------------


STREAMS = ((0, "input"), (1, "output"), (2, "error"))


def standard_stream(path: Path) -> str | None:
    """Which of this process's standard streams ``path`` is (``/dev/stdout``, a
    ``/proc/self/fd`` link, or the very file the shell redirected one to), else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    for fd, name in STREAMS:
        try:
            s = os.fstat(fd)
        except OSError:
            continue
        if os.path.samestat(s, st):
            return name
    return None


def check_output(path: Path | None, option: str) -> None:
    """Refuse an output path that cannot be written, before any work is done: an
    existing entry that is not a regular file (a directory, a device such as /dev/null,
    a FIFO, a socket), a write-protected file, a missing parent directory, and the
    command's own standard streams (an output is written to a new file renamed over the
    old: through ``/dev/stdout`` that replaced the file the shell appends to)."""
    if path is None:
        return
    if str(path) == "-":
        raise UsageError(f"{option} takes a file name (- would mix it with the output); give a path")
    given = Path(path)
    check_name_length(given, option)
    path = written_path(given)
    status, _ = file_status(path)
    if status not in ("missing", "file"):
        what = f"is {status}" if status.startswith("a ") else f"cannot be used ({status})"
        raise UsageError(f"{option} {shown(path)} {what}; give the name of a regular file to write")
    stream = standard_stream(given) if status == "file" else None
    if stream is not None:
        raise UsageError(f"{option} {shown(given)} is this command's standard {stream}; give a file of its own")
    if status == "file" and not os.access(path, os.W_OK):
        if read_only_mount(path):
            raise UsageError(f"{option} {shown(path)} is on a read-only file system; write elsewhere")
        raise UsageError(f"{option} {shown(path)} is write-protected; make it writable or write elsewhere")
    parent = path.parent
    if not is_dir(parent):
        raise UsageError(
            f"{option} {shown(path)}: directory {shown(parent)} does not exist; create it or write elsewhere"
        )
    why = cannot_write_in(parent)
    if why is not None:
        raise UsageError(f"{option} {shown(path)}: cannot write in {shown(parent)} ({why})")


def read_only_mount(path: Path) -> bool:
    """Whether ``path`` lies on a file system mounted read-only (no chmod helps; a file
    bind-mounted read-only on its own too)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_name_length(path: Path, option: str) -> None:
    """Refuse a name the file system cannot hold (a component over 255 bytes, a path over
    4 KiB) as a usage error, not the OSError it raises wherever the name is first used."""
    try:
        os.lstat(path)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise UsageError(
                f"{option} {shown(path)}: the name is too long for the file system; give a shorter one"
            ) from None


class OwnOutput(NamedTuple):
    """A kind of file moespeq writes and may replace: ``what`` it is in words, and
    ``recognise(head, tail)``, whether a file's first 4 KiB and last 64 KiB (the whole file
    where ``tail`` is shorter) are one moespeq wrote."""

    what: str
    recognise: Callable[[bytes, bytes], bool]


def holds_another_file(path: Path, own: OwnOutput) -> bool:
    """Whether ``path`` is a non-empty regular file that is not ``own``'s kind: a user's
    file, never to be replaced (an empty file held nothing). Raises OSError if unreadable."""
    if not is_regular(path):
        return False
    with open(path, "rb") as f:
        head = f.read(4096)
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - 65536))
        tail = f.read(65536)
    return bool(head) and not own.recognise(head, tail)


def check_replaces_own(path: Path | None, option: str, own: OwnOutput) -> None:
    """Refuse an output ``path`` that holds anything but an earlier output of the same kind
    (``own``). A user's file given by mistake (``--trace notes.txt``) is never overwritten;
    ``atomic_write_text`` checks again when it writes, minutes later."""
    if path is None:
        return
    path = written_path(Path(path))
    try:
        other = holds_another_file(path, own)
    except OSError as e:
        raise UsageError(f"{option} {shown(path)} cannot be read ({e.strerror}); give a new file name") from None
    if other:
        raise UsageError(
            f"{option} {shown(path)} exists and is not {own.what} (only an earlier one is replaced); "
            "give a new file name"
        )


def cannot_write_in(directory: Path) -> str | None:
    """Why a file cannot be created in ``directory``, or None: a real probe (os.access
    says yes to root on a read-only mount or in /sys)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".moespeq-", suffix=".probe", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno == errno.ENOENT and is_dir(directory):  # /proc, /sys: "No such file or directory" misleads
            return "it takes no new files: a kernel's file system, such as /proc or /sys"
        return e.strerror or str(e)
    return None


def check_not_input(path: Path | None, option: str, inputs: list[tuple[str, Path | None]]) -> None:
    """Refuse an output that would replace one of the run's inputs (``inputs``: (what,
    path) pairs): a file given as input, or a file already inside an input directory (a
    checkpoint's weights, its config). A new file inside a checkpoint directory is fine."""
    if path is None:
        return
    target = Path(os.path.realpath(path))
    for what, source in inputs:
        if source is None:
            continue
        real = Path(os.path.realpath(source))
        inside = is_dir(real) and real in target.parents and os.path.lexists(target)
        if target == real or inside:
            raise UsageError(f"{option} {shown(path)} would overwrite {what} {shown(source)}; give another file name")


def written_path(path: Path) -> Path:
    """Where a write of ``path`` lands: a symlink to a regular file is followed (its
    target is replaced, the link stays)."""
    return path.resolve() if path.is_symlink() and is_regular(path) else path


def umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def new_file_mode(path: Path) -> int:
    """The mode a write of ``path`` gives: the old file's where it replaces one, else what
    ``open`` would give a new file (0666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~umask()


def pid_alive(pid: int) -> bool:
    """A process ``pid`` exists on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def remove_stale(directory: Path, prefix: str, suffix: str = "") -> None:
    """Remove the regular files in ``directory`` named exactly as ``tempfile.mkstemp``
    names ours (``<prefix><pid>.<8 random characters><suffix>``) whose writer ``pid`` is
    gone: what a killed write left. A user's file that only looks alike is left alone."""
    shape = re.compile(re.escape(prefix) + r"(\d+)\.[a-z0-9_]{8}" + re.escape(suffix))
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        m = shape.fullmatch(entry.name)
        if m and not pid_alive(int(m.group(1))) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def atomic_write_text(path: Path, text: str, own: OwnOutput | None = None) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``: never a
    half-written file, and never anything but a regular file replaced. A symlink to a
    regular file is followed (its target is replaced, the link stays). The temporary
    file has a name no other file has (``mkstemp``, with the writer's pid): nothing but it
    is ever removed, and what a killed writer of the same target left. With ``own``, a
    file that is not of its kind is never replaced: checked just before the rename (a
    command checks its outputs when it starts; one may appear while it runs)."""
    path = written_path(Path(path))
    status, _ = file_status(path)
    if status not in ("missing", "file"):
        raise MoespeqError(f"cannot write {path}: it is {status}, not a regular file")
    tmp = None
    stem = f".{path.name[:60]}."
    try:
        remove_stale(path.parent, stem, ".tmp")
        mode = new_file_mode(path)
        fd, tmp = tempfile.mkstemp(prefix=f"{stem}{os.getpid()}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        try:
            other = own is not None and holds_another_file(path, own)
        except OSError:  # (one that cannot be read counts as another's)
            other = True
        if other:
            raise MoespeqError(
                f"not writing {path}: a file that is not {own.what} appeared there while moespeq ran; "
                "it is left as it was (run again with another file name)"
            )
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        remedy = "free some space" if e.errno == errno.ENOSPC else "check that its directory exists and is writable"
        raise MoespeqError(f"cannot write {path} ({e.strerror}); {remedy}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, what: str):
    """Hold an exclusive advisory lock on ``lock_file`` (created if needed) or fail at
    once: a second moespeq doing the same work says so instead of racing the first. The
    lock dies with its process, so a killed run never holds it; the file is removed when
    the lock is let go (a lock taken on a file its holder had just removed is taken again
    on the file now at the path, so two never hold "the" lock at once)."""
    import fcntl

    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise MoespeqError(f"cannot create lock file {lock_file} ({e.strerror}); check the directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MoespeqError(f"another moespeq is {what}; wait for it to finish, then run again") from None
        try:
            held = os.fstat(fd)
            now = os.stat(lock_file)
        except OSError:  # removed by the holder we waited on: lock what is there now
            os.close(fd)
            continue
        if os.path.samestat(held, now):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_file)
        os.close(fd)


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/moespeq (default ~/.cache/moespeq). A relative $XDG_CACHE_HOME is
    ignored, as the XDG spec says (it would put a cache in whatever directory a command
    runs from)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or ""
    return (Path(xdg) if os.path.isabs(xdg) else home() / ".cache") / "moespeq"


def anchor_hub_cache() -> None:
    """huggingface_hub finds its cache from $HOME as given (``~/.cache/huggingface``):
    with HOME empty that is ``/.cache``, with a relative HOME (or XDG_CACHE_HOME)
    wherever a command runs. Where nothing names the cache absolutely, HF_HOME is set
    from ``home()`` before huggingface_hub reads it, as moespeq's own cache is."""
    if os.environ.get("HF_HOME") or os.environ.get("HF_HUB_CACHE"):
        return
    xdg = os.environ.get("XDG_CACHE_HOME") or ""
    if os.path.isabs(xdg) or (not xdg and os.path.isabs(os.environ.get("HOME") or "")):
        return  # (where huggingface_hub's own reading is absolute)
    os.environ["HF_HOME"] = str(home() / ".cache" / "huggingface")


def home() -> Path:
    """$HOME where it is an absolute path; else (empty, relative: a service's or a
    container's environment) the account's home directory from the password database,
    not ``/`` or the directory a command runs from (``Path.home()`` with ``HOME=`` is
    ``/``: the cache went to ``/.cache``)."""
    given = os.environ.get("HOME") or ""
    if os.path.isabs(given):
        return Path(given)
    try:
        import pwd

        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except (ImportError, KeyError):  # an account with no entry (`docker run --user 12345`)
        return Path(tempfile.gettempdir()) / f"moespeq-{os.getuid()}"


def give_back_freed_memory() -> None:
    """Return the heap's freed pages to the system (glibc ``malloc_trim``; nothing
    elsewhere). glibc raises its mmap threshold as large blocks are freed, so later
    temporaries of a few MiB (an expert's, quantizing it) come from the heap, and what is
    freed between the results kept stays in the process: quantizing a draft of 0.7 GB
    held 1.8 GB. Called after each expert of work that makes such temporaries."""
    global _trim
    if _trim is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None).malloc_trim
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
            _trim = fn
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim = None  # glibc's malloc_trim, once looked up (False: not glibc)
