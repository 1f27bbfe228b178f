"""``moespeq rm``: a model pulled into the Hugging Face cache and its drafts go, nothing
else does; every name is checked before anything is deleted; a download or a draft
being written stops it; it asks at a terminal and is never half done by one Ctrl-C."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pull import hub  # noqa: F401 - the fake hub fixture

from moespeq_cli.removal import files_size


@pytest.fixture
def pulled(hub, cli, monkeypatch, tmp_path):  # noqa: F811
    """Two models pulled, the first quantized (its draft in moespeq's cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for repo in ("acme/tiny-olmoe", "acme/plan-only"):
        assert cli("pull", repo).exit_code == 0
    assert cli("quantize", "acme/tiny-olmoe").exit_code == 0
    return tmp_path / "cache"


def listed(cli) -> dict:
    r = cli("list", "--json")
    assert r.exit_code == 0, r.stderr
    return {m["name"]: m for m in json.loads(r.stdout)["models"]}


def test_rm_removes_the_model_and_its_drafts_and_nothing_else(pulled, cli, tmp_path):
    model = listed(cli)["acme/tiny-olmoe"]
    folder = pulled / "models--acme--tiny-olmoe"
    (draft,) = map(Path, model["drafts"])
    assert draft.is_relative_to(tmp_path / "xdg")
    size, draft_size = files_size(folder), files_size(draft)
    other = {p: p.read_bytes() for p in (pulled / "models--acme--plan-only").rglob("*") if p.is_file()}

    r = cli("rm", "acme/tiny-olmoe", "--yes", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert [m["repo"] for m in out["removed"]] == ["acme/tiny-olmoe"]
    assert out["removed"][0]["drafts"] == [str(draft)] and out["removed"][0]["draft_bytes"] == draft_size
    assert out["freed_bytes"] == size + draft_size > 0
    assert not folder.exists() and not draft.exists()
    assert {p: p.read_bytes() for p in other} == other  # the other model untouched
    assert set(listed(cli)) == {"demo", "acme/plan-only"}
    r = cli("run", "acme/tiny-olmoe", "-p", "hi", "-n", "2")
    assert r.exit_code == 2 and "is not downloaded" in r.stderr
    r = cli("rm", "acme/plan-only", "-y")
    assert r.exit_code == 0 and r.stdout.startswith("Removed acme/plan-only (")
    assert set(listed(cli)) == {"demo"}


@pytest.mark.parametrize(
    "names, needle",
    [
        (["acme/plan-only", "acme/nothing-here"], "acme/nothing-here is not on this machine"),
        (["acme/plan-only", "demo"], "moespeq keeps no draft of it; nothing to remove"),
        (["acme/plan-only", "acme/tiny-olmo"], "did you mean 'acme/tiny-olmoe'?"),
        (["acme/plan-only", "{dir}"], "is a directory of yours, not a model"),
    ],
)
def test_every_name_is_checked_before_anything_is_deleted(pulled, cli, tmp_path, names, needle):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    before = set(listed(cli))
    r = cli("rm", *[n.format(dir=mine) for n in names], "--yes")
    assert r.exit_code == 2 and needle in r.stderr and r.stderr.count("\n") == 1
    assert set(listed(cli)) == before and (mine / "config.json").exists()


def test_without_a_terminal_rm_asks_for_yes(pulled, cli):
    r = cli("rm", "acme/plan-only")
    assert r.exit_code == 2 and "give --yes" in r.stderr
    assert "acme/plan-only" in listed(cli)


def test_a_download_in_progress_or_a_draft_being_written_stops_it(pulled, cli, tmp_path):
    from moespeq_cli.fs import exclusive_lock
    from moespeq_cli.quant.draft_store import lock_file

    locks = pulled / ".locks" / "models--acme--plan-only"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / "abc.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as huggingface_hub's FileLock holds it while it writes the blob
        r = cli("rm", "acme/tiny-olmoe", "acme/plan-only", "--yes")
        assert r.exit_code == 1 and "acme/plan-only is being downloaded" in r.stderr
    finally:
        os.close(fd)
    assert {"acme/tiny-olmoe", "acme/plan-only"} <= set(listed(cli))  # neither removed
    (draft,) = listed(cli)["acme/tiny-olmoe"]["drafts"]
    with exclusive_lock(lock_file(Path(draft)), "writing"):
        r = cli("rm", "acme/tiny-olmoe", "--yes")
    assert r.exit_code == 1 and "another moespeq is writing the draft" in r.stderr
    assert Path(draft).exists() and "acme/tiny-olmoe" in listed(cli)
    assert cli("rm", "acme/tiny-olmoe", "acme/plan-only", "--yes").exit_code == 0


def test_a_repository_the_hub_api_cannot_read_is_removed_whole(pulled, cli):
    folder = pulled / "models--acme--plan-only"
    for link in (folder / "snapshots").rglob("*.json"):
        link.unlink()  # (a removal cut short: snapshots without their files, blobs left)
    (folder / "refs" / "main").unlink()
    assert folder.exists()
    r = cli("rm", "acme/plan-only", "--yes", "--json")
    assert r.exit_code == 0, r.stderr
    assert not folder.exists() and json.loads(r.stdout)["freed_bytes"] > 0


def test_a_file_it_may_not_delete_is_named(pulled, cli, monkeypatch):
    folder = pulled / "models--acme--plan-only"
    real_unlink = os.unlink

    def refusing(path, *a, **kw):
        if str(path).endswith("config.json") or "config.json" in os.fspath(path):
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(os, "unlink", refusing)
        m.setattr(os, "remove", refusing)
        r = cli("rm", "acme/plan-only", "--yes")
    assert r.exit_code == 1 and "could not delete" in r.stderr and "permission denied" in r.stderr
    assert "run `moespeq rm` again" in r.stderr and r.stderr.count("\n") == 1
    assert folder.exists()


def rm_at_a_terminal(cache: Path, xdg: Path, answer: bytes, *names: str) -> tuple[int, str]:
    import pty

    primary, secondary = pty.openpty()
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "XDG_CACHE_HOME": str(xdg)}
    p = subprocess.Popen(
        [sys.executable, "-m", "moespeq_cli", "rm", *names],
        stdin=secondary,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(secondary)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
            if b"[y/N]" in (err := _peek(p)):
                break
        os.write(primary, answer)
        out, err = p.communicate(timeout=30)
    finally:
        os.close(primary)
    return p.returncode, (_seen.pop(p.pid, b"") + err).decode()


_seen: dict[int, bytes] = {}


def _peek(p) -> bytes:
    """What the process has written to stderr so far (kept for ``communicate``'s rest)."""
    import select

    while select.select([p.stderr], [], [], 0)[0]:
        chunk = os.read(p.stderr.fileno(), 4096)
        if not chunk:
            break
        _seen[p.pid] = _seen.get(p.pid, b"") + chunk
    return _seen.get(p.pid, b"")


def test_at_a_terminal_it_asks_and_says_what_goes(pulled, cli, tmp_path):
    code, err = rm_at_a_terminal(pulled, tmp_path / "xdg", b"n\n", "acme/tiny-olmoe")
    assert code == 0 and "Nothing removed." in err
    assert "acme/tiny-olmoe:" in err and "and 1 draft (" in err and "Remove acme/tiny-olmoe," in err
    assert "acme/tiny-olmoe" in listed(cli)
    code, err = rm_at_a_terminal(pulled, tmp_path / "xdg", b"y\n", "acme/tiny-olmoe", "acme/plan-only")
    assert code == 0, err
    assert "Remove 2 models," in err and set(listed(cli)) == {"demo"}


def test_a_signal_waits_for_an_uninterrupted_block_and_stops_the_next():
    from moespeq_cli.cli.signals import Signals, uninterrupted

    signals = Signals()
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt):
            for block in range(3):  # (rm's models, one after another)
                with uninterrupted("removing x"):
                    if block == 0:
                        signal.raise_signal(signal.SIGINT)
                    time.sleep(0.1)  # the watcher looks every 20 ms: it must wait for the block
                    reached.append(block)
    finally:
        signals.restore()
    assert reached == [0]
    signals = Signals()
    try:
        with pytest.raises(OSError, match="the block's own"):  # a block that fails: its error, not the signal
            with uninterrupted("removing x"):
                signal.raise_signal(signal.SIGTERM)
                raise OSError("the block's own")
        time.sleep(0.1)  # (nothing raised later either)
    finally:
        signals.restore()


def test_a_ctrl_c_held_back_before_the_block_is_no_second_press():
    """A Ctrl-C that came during an import (held back, the watcher to send it again once
    the import is over) just before an uninterrupted block: the watcher's resend landed
    in the block and counted as a second press, ending the process mid-deletion."""
    code = """
import signal, threading, time
from moespeq_cli.cli.signals import Signals, uninterrupted
signals = Signals()
signals.pending.add(signal.SIGINT)  # held back by an import a moment ago
try:
    with uninterrupted("removing x"):
        signals.watcher = threading.Thread(target=signals.watch, daemon=True)  # (its 20 ms look comes in here)
        signals.watcher.start()
        time.sleep(0.3)
        print("end of block", flush=True)
    time.sleep(1)
except KeyboardInterrupt:
    print("raised after it", flush=True)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.split() == ["end", "of", "block", "raised", "after", "it"], (r, r.stderr)


def cached_repo(cache: Path, repo: str, rev: str, files: dict[str, bytes], shared: tuple[str, ...] = ()) -> Path:
    """A repository in the Hugging Face cache's layout, as huggingface_hub writes it: each
    file a link from the snapshot to ``blobs/<etag>``; a file named in ``shared`` a link on
    into the cache-wide store (``blobs/<xx>/<xet hash>``, with its manifest of links)."""
    import hashlib

    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / rev
    for d in (folder / "blobs", folder / "refs", snap):
        d.mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(rev)
    for name, data in files.items():
        etag = hashlib.sha1(data).hexdigest()
        blob = folder / "blobs" / etag
        if name in shared:
            xet = hashlib.sha256(data).hexdigest()
            store = cache / "blobs" / xet[:2] / xet
            store.parent.mkdir(parents=True, exist_ok=True)
            (cache / "blobs" / ".huggingface-shared-blobs").write_text("1\n")
            store.write_bytes(data)
            with open(f"{store}.refs", "a") as manifest:
                manifest.write(f"{folder.name}/blobs/{etag}\n")
            blob.symlink_to(os.path.relpath(store, blob.parent))
        else:
            blob.write_bytes(data)
        (snap / name).symlink_to(f"../../blobs/{etag}")
    return folder


def test_a_repository_sharing_a_commit_with_another_leaves_it_alone(cli, monkeypatch, tmp_path):
    """A renamed or mirrored repository keeps its commits: huggingface_hub finds revisions
    by hash over the whole cache, and the other's snapshot went too (1 run in 2)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    files = {"config.json": b'{"model_type": "olmoe"}', "model.safetensors": b"x" * 1000}
    for repo in ("old-org/model", "new-org/model", "mirror/model"):
        cached_repo(cache, repo, "a" * 40, files)
    for _ in range(4):  # (the hub's order over repositories is a set's)
        other = cache / "models--new-org--model"
        assert cli("rm", "old-org/model", "--yes").exit_code == 0
        assert {p.name for p in (other / "snapshots" / ("a" * 40)).iterdir()} == set(files)
        assert (cache / "models--mirror--model" / "snapshots" / ("a" * 40) / "model.safetensors").read_bytes()
        cached_repo(cache, "old-org/model", "a" * 40, files)


def test_shared_payloads_go_with_the_last_repository_linking_them(cli, monkeypatch, tmp_path):
    """Through a cache path that is a link (as ~/.cache often is): the payload only the
    removed model links is collected and counted, the one another model links stays."""
    real = tmp_path / "real-cache"
    real.mkdir()
    (tmp_path / "cache").symlink_to(real)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    mine, both = b"m" * 3000, b"s" * 5000
    cached_repo(
        real, "acme/a", "a" * 40, {"config.json": b"{}", "mine.bin": mine, "both.bin": both}, ("mine.bin", "both.bin")
    )
    cached_repo(real, "acme/b", "b" * 40, {"config.json": b"{}", "both.bin": both}, ("both.bin",))
    folder_bytes = files_size(real / "models--acme--a")
    r = cli("rm", "acme/a", "--yes", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["freed_bytes"] == folder_bytes + len(mine)
    payloads = {p.read_bytes() for p in (real / "blobs").glob("*/*") if p.suffix == ""}
    assert payloads == {both}
    assert (real / "models--acme--b" / "snapshots" / ("b" * 40) / "both.bin").read_bytes() == both


def test_an_error_the_hub_api_lets_through_is_one_line(pulled, cli, monkeypatch):
    import errno

    real_rmdir = os.rmdir

    def busy(path, *a, **kw):
        if "snapshots" in os.fspath(path):
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_rmdir(path, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(os, "rmdir", busy)
        r = cli("rm", "acme/plan-only", "--yes")
    assert r.exit_code == 1 and "could not delete" in r.stderr and "busy" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    assert cli("rm", "acme/plan-only", "--yes").exit_code == 0  # once the cause is gone


def test_a_draft_it_cannot_delete_leaves_the_model_for_rm_again(pulled, cli, monkeypatch, tmp_path):
    real_unlink = os.unlink
    drafts = str(tmp_path / "xdg")

    def refusing(path, *a, **kw):
        name = os.fspath(path)
        if (drafts in name and not name.endswith(".probe")) or (kw.get("dir_fd") is not None and "manifest" in name):
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(os, "unlink", refusing)
        r = cli("rm", "acme/tiny-olmoe", "--yes")
    assert r.exit_code == 1 and "could not delete" in r.stderr
    assert (pulled / "models--acme--tiny-olmoe").is_dir()
    assert cli("rm", "acme/tiny-olmoe", "--yes").exit_code == 0
    assert not (pulled / "models--acme--tiny-olmoe").exists()


def test_a_first_quantize_still_writing_stops_it(pulled, cli):
    from moespeq_cli.fs import exclusive_lock
    from moespeq_cli.quant.draft_store import default_draft_dir, lock_file

    snap = Path(listed(cli)["acme/plan-only"]["path"])
    out = default_draft_dir(snap, "fp4", 256)  # none there yet: quantize is writing it
    assert not out.exists()
    with exclusive_lock(lock_file(out), "writing"):
        r = cli("rm", "acme/plan-only", "--yes")
    assert r.exit_code == 1 and "another moespeq is writing the draft" in r.stderr
    assert "acme/plan-only" in listed(cli)


def test_a_model_named_by_its_cache_folder_twice_or_beside_a_directory_of_that_name(pulled, cli, tmp_path, monkeypatch):
    """The cache folder itself (or a snapshot in it) names its model; a model named twice
    goes once; a hub id is the cached model even where a directory here has that name (rm
    removes nothing outside the cache): that directory stays."""
    snapshot = Path(listed(cli)["acme/tiny-olmoe"]["path"])
    r = cli("rm", str(snapshot), "acme/tiny-olmoe", "--yes", "--json")
    assert r.exit_code == 0, r.stderr
    assert [m["repo"] for m in json.loads(r.stdout)["removed"]] == ["acme/tiny-olmoe"]
    here = tmp_path / "work"
    (here / "acme" / "plan-only").mkdir(parents=True)
    (here / "acme" / "plan-only" / "config.json").write_text("{}")
    monkeypatch.chdir(here)
    r = cli("rm", "acme/plan-only", "--yes")
    assert r.exit_code == 0 and not (pulled / "models--acme--plan-only").exists(), r.stderr
    assert (here / "acme" / "plan-only" / "config.json").read_text() == "{}"


def test_a_model_named_by_its_cache_folders_bare_name(pulled, cli, tmp_path, monkeypatch):
    """``models--ORG--NAME`` as ``ls`` of the cache shows it, from anywhere; a name of that
    form not in the cache is refused with a suggestion, nothing removed."""
    monkeypatch.chdir(tmp_path)
    r = cli("rm", "models--acme--tiny-olmo", "--yes")
    assert r.exit_code == 2 and "not on this machine" in r.stderr and "acme/tiny-olmoe" in r.stderr, r.stderr
    assert (pulled / "models--acme--tiny-olmoe").is_dir()
    r = cli("rm", "models--acme--tiny-olmoe", "--yes", "--json")
    assert r.exit_code == 0, r.stderr
    assert [m["repo"] for m in json.loads(r.stdout)["removed"]] == ["acme/tiny-olmoe"]
    assert not (pulled / "models--acme--tiny-olmoe").exists()
    assert (pulled / "models--acme--plan-only").is_dir()


def test_rm_demo_removes_the_drafts_built_of_it_alone(cli, monkeypatch, tmp_path):
    from moespeq_cli.model_ref import DEMO_DIR

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    r = cli("rm", "demo", "--yes")
    assert r.exit_code == 2 and "nothing to remove" in r.stderr
    package = {p: p.stat().st_size for p in DEMO_DIR.parent.rglob("*") if p.is_file() and "__pycache__" not in str(p)}
    assert cli("quantize").exit_code == 0  # the demo's draft: in moespeq's cache
    assert cli("quantize", "--out", str(tmp_path / "mine")).exit_code == 0  # one of the user's: stays
    (built,) = (tmp_path / "xdg" / "moespeq" / "drafts").glob("*demo*")
    r = cli("rm", "demo", "--yes", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["removed"][0]["drafts"] == [str(built)] and not built.exists()
    assert (tmp_path / "mine" / "manifest.json").exists()
    now = {p: p.stat().st_size for p in DEMO_DIR.parent.rglob("*") if p.is_file() and "__pycache__" not in str(p)}
    assert now == package  # the demo and the draft shipped with it
