"""Build and load the CPU kernels (cpu_matvec.c) once per machine, with the system C compiler.

The shared library is compiled with ``-O3 -march=native`` on first use into the user's
cache (``$XDG_CACHE_HOME/moespeq/kernels``, keyed by the source, the compiler and this CPU's
flags, so a changed source or a moved cache never loads a stale or foreign build) and
loaded with ctypes. It takes under a second; a machine with no compiler, or
``MOESPEQ_KERNELS=off``, gets ``None`` and moespeq computes with torch instead (the same
numerics class, fp32 accumulation; slower). The build is written to a temporary file,
synced and renamed, so two processes building at once never load half a library, and its
SHA-256 is kept beside it: a library that does not match (cut short by a crash, damaged)
is built again rather than loaded (a truncated one would crash the process with a bus
error). A killed build's temporary file is removed by the next build.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from moespeq_cli.errors import MoespeqError
from moespeq_cli.fs import atomic_write_text, remove_stale

SOURCE = Path(__file__).with_name("cpu_matvec.c")
# -pipe: the compiler's stages talk through pipes, not temporary files in /tmp (which a
# killed build left there, half a megabyte each)
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-pthread", "-pipe"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet
why_not: str | None = None  # why the kernels are unavailable, when they are


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    from moespeq_cli.fs import cache_dir as moespeq_cache

    return moespeq_cache() / "kernels"


def _compiler() -> str | None:
    """$CC where it is set (a command not found is no compiler: not silently another), else
    the first of cc, gcc and clang on PATH."""
    if os.environ.get("CC"):
        return os.environ["CC"] if shutil.which(os.environ["CC"]) else None
    return next((cc for cc in ("cc", "gcc", "clang") if shutil.which(cc)), None)


def _build(cc: str) -> Path:
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[:1]
    key = hashlib.sha256(src + repr((version, FLAGS, _cpu_flags(), platform.machine())).encode()).hexdigest()[:16]
    out = cache_dir() / f"cpu_matvec-{key}.so"
    digest = out.with_suffix(".sha256")
    if out.parent.is_dir():
        remove_stale(out.parent, "tmp.", ".so.tmp")  # a killed build's (its process gone)
    if _intact(out, digest):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f"tmp.{os.getpid()}.", suffix=".so.tmp")
    os.close(fd)
    try:
        r = compile_in_own_group([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], timeout=120)
        if r.returncode != 0:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:]
            raise RuntimeError(f"{cc} failed" + (f": {last[0]}" if last else f" (exit {r.returncode})"))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
            built = hashlib.sha256(f.read()).hexdigest()
        os.replace(tmp, out)
        atomic_write_text(digest, built + "\n")  # after the library: a crash between leaves a build to redo
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def compile_in_own_group(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` of a compiler in a process group of its own, which goes with
    moespeq: where moespeq alone is stopped (``kill PID``, a closed terminal, Ctrl-C
    raised here) the whole group is told to stop (SIGTERM: the driver removes its
    temporary files) and waited for, then killed; ``run`` killed only the driver, and its
    ``cc1`` went on, orphaned."""
    import signal

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(5)
        except ProcessLookupError:
            p.wait()
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _intact(lib: Path, digest: Path) -> bool:
    """``lib`` is there and its bytes are the build's (its SHA-256 as written beside it)."""
    from moespeq_cli.fs import read_bytes, read_text

    try:  # regular files only: a FIFO in their place would block the open
        want = read_text(digest, 1024, "the kernels' digest").strip()
        return hashlib.sha256(read_bytes(lib, 256 * 2**20, "the kernels")).hexdigest() == want
    except (OSError, MoespeqError):
        return False


def _declare(lib: ctypes.CDLL) -> None:
    p, i, L, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    lib.ms_version.restype = i
    lib.ms_simd.restype = i
    lib.ms_init.argtypes = [i, i]
    lib.ms_init.restype = i
    lib.ms_linear.argtypes = [p, p, i, p, p, L, L, L]
    lib.ms_linear.restype = None
    lib.ms_expert.argtypes = [p, p, p, p, i, p, p, L, L, L, i]
    lib.ms_expert.restype = None
    lib.ms_moe.argtypes = [p, L, L, L, L, L, p, p, p, p, p, i, i, p, p]
    lib.ms_moe.restype = i
    lib.ms_linear_mxfp4.argtypes = [p, p, p, p, p, L, L, L]
    lib.ms_linear_mxfp4.restype = None
    lib.ms_nf4_bf16.restype = i
    lib.ms_linear_nf4.argtypes = [p, p, p, p, L, p, p, L, L, L]
    lib.ms_linear_nf4.restype = None
    lib.ms_linear_fp8.argtypes = [p, p, p, L, L, p, p, L, L, L]
    lib.ms_linear_fp8.restype = None
    lib.ms_dequant_4bit.argtypes = [p, p, p, L, L, p, i]
    lib.ms_dequant_4bit.restype = None
    lib.ms_expert_t.argtypes = [p, p, p, p, p, i, f, f, p, p, L, L, L]
    lib.ms_expert_t.restype = None
    lib.ms_heads.argtypes = [p, L, L, p, i, L, i, p, L, L, L, L, L, L]
    lib.ms_heads.restype = None
    lib.ms_expert_t_scratch.argtypes = [L, L, L]
    lib.ms_expert_t_scratch.restype = L
    lib.ms_rmsnorm.argtypes = [p, p, ctypes.c_float, p, L, L]
    lib.ms_rmsnorm.restype = None
    lib.ms_rope.argtypes = [p, L, L, p, p, p, L, L, L]
    lib.ms_rope.restype = None
    lib.ms_attend.argtypes = [p, L, L, p, L, L, p, L, L, p, p, L, L, L, L, L, L, L, L, f]
    lib.ms_attend.restype = i
    lib.ms_attn_block_scratch.argtypes = [L, L, L, L]
    lib.ms_attn_block_scratch.restype = L
    lib.ms_attn_block.argtypes = [p, L, L, p, i, p, p, i, p, p, p, f, p, p, p, L, L, p, L, L, L, L, L, L, L, f, p, p]
    lib.ms_attn_block.restype = i
    lib.ms_hold.argtypes = [i]
    lib.ms_hold.restype = None
    lib.ms_route_softmax.argtypes = [p, L, L, L, i, p, p]
    lib.ms_route_softmax.restype = i
    lib.ms_layer_scratch.argtypes = [p, L]
    lib.ms_layer_scratch.restype = L
    lib.ms_layer_forward.argtypes = [p, p, L, p, p, p, L, L, p, L, L, L, p, p]
    lib.ms_layer_forward.restype = i
    lib.ms_argmax.argtypes = [p, L, L, p]
    lib.ms_model_scratch.argtypes = [p, L, L]
    lib.ms_model_scratch.restype = L
    lib.ms_model_forward.argtypes = [p, L, p, i, L, p, L, p, p, p, p, p, p, L, p, f, p, i, p, i, p, p]
    lib.ms_model_forward.restype = i
    lib.ms_argmax.restype = i


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first use; None where they cannot be (``why_not`` says)."""
    global _lib, why_not
    if _lib is not False:
        return _lib
    with _lock:
        if _lib is not False:
            return _lib
        if os.environ.get("MOESPEQ_KERNELS", "").lower() in ("0", "off", "no", "false"):
            why_not, _lib = "turned off by MOESPEQ_KERNELS", None
            return None
        if platform.system() != "Linux":
            why_not, _lib = f"not built on {platform.system()} (Linux only for now)", None
            return None
        cc = _compiler()
        if cc is None:
            cc_env = os.environ.get("CC")
            why_not = (
                f"CC={cc_env} is not a command here" if cc_env else "no C compiler found (cc, gcc or clang; or set CC)"
            )
            _lib = None
            return None
        try:
            lib = ctypes.CDLL(str(_build(cc)))
            _declare(lib)
        except (OSError, RuntimeError, subprocess.SubprocessError, MoespeqError) as e:
            # (MoespeqError: the build's digest could not be written beside it, a full disk)
            why_not, _lib = f"could not build the CPU kernels: {e}", None
            return None
        _lib = lib
        return lib
