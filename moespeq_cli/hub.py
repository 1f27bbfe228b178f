"""Downloads from the Hugging Face Hub (``moespeq pull``).

A repository is checked before anything is downloaded (``preflight``): its top level must
hold a config.json of a family moespeq implements and, for a run, safetensors weights.
Only the files a run needs (the top level's safetensors weights and index, config,
tokenizer, generation config; not the copies some repositories keep in subfolders) go
into the standard Hugging Face cache, so other tools reuse them and later commands
resolve the alias or id without the network. An interrupted pull keeps the
files it finished (huggingface_hub renames each into place when it is whole) and the
same command fetches the rest. A dropped connection is resumed within the pull (a range
request for the rest), but a file a killed or interrupted pull cut short starts over
(huggingface_hub 2.x writes each download to a file of its own and does not take it up
again), and the partial file a killed pull left is removed by the next pull once it has not
grown for ``STALE_S``. Ctrl-C stops a pull at once. ``--local-dir`` takes a new or empty
directory, or one an earlier pull of the same model wrote (never a directory of the user's
own files, which a download would overwrite, nor another model's pull, which it would mix
with). Every hub failure becomes one
line that says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import sys
import threading
import time
from pathlib import Path

from moespeq_cli.errors import MoespeqError, UnknownModelError, UsageError

RUN_FILES = [
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",  # where transformers saves a chat template (it comes first)
    "chat_template.json",  # a multimodal checkpoint's processor template
]
CONFIG_FILES = ["config.json", "generation_config.json"]
STALE_S = 600  # a partial download untouched this long is a killed pull's, never a live one's
TOP_LEVEL_ONLY = ["*/*"]  # copies in subfolders (gpt-oss's original/, metal/) are not what a run loads
PULLED = Path(".cache") / "moespeq" / "pulled.json"  # in --local-dir: the repository pulled there


class HubError(MoespeqError):
    """The hub refused or could not be reached."""


AGAIN = "run the same command again (the files already downloaded are kept)"


def download(snapshot_download, kwargs: dict) -> str:
    """``snapshot_download(**kwargs)`` in a thread of its own, so that Ctrl-C stops the pull
    at once: huggingface_hub's download threads do not see it, and the process would
    otherwise wait for the file in flight to finish. The files already downloaded are
    whole (each is renamed into place when complete); the one cut short is left to
    ``remove_partial_downloads``."""
    result: dict = {}

    def work() -> None:
        try:
            result["path"] = snapshot_download(**kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = err

    worker = threading.Thread(target=work, name="moespeq-pull", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        sys.stderr.write(f"\nmoespeq: pull interrupted; {AGAIN}\n")
        sys.stderr.flush()
        os._exit(130)  # the download threads are not ours to join: end the process now
    if "error" in result:
        raise result["error"]
    return result["path"]


def check_local_dir(local_dir: Path, repo: str) -> None:
    """``--local-dir`` must be new, or hold no file a pull writes (``RUN_FILES``) but those
    an earlier pull of ``repo`` wrote there, unchanged since: moespeq records the repository
    it pulls into a directory (``PULLED``), and huggingface_hub each file it wrote
    (``.cache/huggingface/download/<name>.metadata``, with the time it wrote it). A user's
    own model files are never downloaded over (a home directory holds
    ``.cache/huggingface`` too, and a pulled ``tokenizer_config.json`` is often edited),
    nor is one model mixed with another (another repository's pull, or one moespeq did not
    record: ``hf download``'s). Files no pull writes (a README, notes) are left alone."""
    if not os.path.lexists(local_dir):
        return
    if not local_dir.is_dir():
        raise UsageError(f"--local-dir {local_dir} exists and is not a directory; give a directory")
    try:
        names = [p.name for p in local_dir.iterdir() if p.name != ".cache"]
    except OSError as err:
        raise UsageError(f"--local-dir {local_dir} cannot be read ({err.strerror}); give another directory") from None
    model_files = [n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in RUN_FILES)]
    if not model_files:
        return
    earlier = pulled_repo(local_dir)
    if earlier != repo:
        whose = f"a pull of {earlier}" if earlier else "model files that moespeq did not pull there"
        raise UsageError(
            f"--local-dir {local_dir} holds {whose} ({model_files[0]!r}); give another directory for {repo} "
            "(the download would overwrite and mix with them)"
        )
    records = local_dir / ".cache" / "huggingface" / "download"
    changed = [n for n in model_files if not written_as_recorded(local_dir / n, records / f"{n}.metadata")]
    if changed:
        raise UsageError(
            f"--local-dir {local_dir} holds {changed[0]!r} changed since the pull (or not written by it); the "
            "download would overwrite it: move it away, or give another directory"
        )


def pulled_repo(local_dir: Path) -> str | None:
    """The repository moespeq recorded pulling into ``local_dir`` (None: none)."""
    try:
        repo = json.loads((local_dir / PULLED).read_text()).get("repo")
    except (OSError, ValueError, AttributeError):
        return None
    return repo if isinstance(repo, str) else None


def written_as_recorded(path: Path, record: Path) -> bool:
    """``path`` is as huggingface_hub wrote it: its record (commit, etag, the time of the
    write on the third line) exists, and the file was not modified after that time."""
    try:
        lines = record.read_text().splitlines()
        return path.stat().st_mtime <= float(lines[2]) + 1.0
    except (OSError, ValueError, IndexError):
        return False


def record_pull(local_dir: Path, repo: str) -> None:
    """Note in ``--local-dir`` which repository is pulled into it (``check_local_dir``),
    before any file arrives: an interrupted pull is the same repository's too."""
    marker = local_dir / PULLED
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"repo": repo}) + "\n")
    except OSError as err:
        raise HubError(
            f"cannot write into --local-dir {local_dir} ({err.strerror}): it is not a writable directory; "
            "give --local-dir one that is"
        ) from None


def remove_partial_downloads(repo: str, local_dir: Path | None) -> None:
    """Remove the partial files (``*.incomplete``) a killed pull of ``repo`` left, once
    they have not grown for ``STALE_S`` (a live pull's file grows as its data arrives)."""
    if local_dir is not None:
        where = Path(local_dir) / ".cache" / "huggingface" / "download"
    else:
        from moespeq_cli.model_ref import repo_dir

        where = repo_dir(repo) / "blobs"
    try:
        partial = [p for p in where.rglob("*.incomplete") if p.is_file() and not p.is_symlink()]
    except OSError:
        return
    now = time.time()
    for p in partial:
        try:
            if now - p.stat().st_mtime > STALE_S:
                p.unlink()
        except OSError:
            pass


def repo_for(model: str) -> str:
    from moespeq_cli.fs import is_dir, is_regular, shown
    from moespeq_cli.model_ref import ALIASES, DEMO, looks_like_hub_id
    from moespeq_cli.text import did_you_mean

    if model in ALIASES:
        return ALIASES[model][0]
    if model == DEMO:
        raise UsageError(f"{DEMO} is built in: there is nothing to pull (`moespeq run` runs it)")
    here = Path(os.path.expanduser(model))
    # a checkpoint here, as `run` reads it first (even one named like org/name); not a
    # --local-dir an earlier pull of this id wrote (pulled again to finish or mend it)
    if is_dir(here) and is_regular(here / "config.json") and pulled_repo(here) != model:
        raise UsageError(
            f"{shown(model)} is a directory here: a local checkpoint needs no pull (`moespeq run {shown(model)}`)"
        )
    if not looks_like_hub_id(model):
        raise UnknownModelError(
            f"unknown model {shown(model)!r}{did_you_mean(model, ALIASES)}; use an alias ({', '.join(ALIASES)}) or a hub id like org/name"
        )
    return model


def pull(model: str, revision: str | None = None, local_dir: Path | None = None, config_only: bool = False) -> Path:
    """Download MODEL's run files (or only its config); returns the local directory. The
    repository is checked first (``preflight``): one moespeq cannot run is refused before
    any file is written."""
    from urllib.parse import urlsplit

    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise UsageError(f"HF_ENDPOINT {endpoint[:60]!r} is not an http(s) URL; fix or unset it")
    try:
        _ = urlsplit(endpoint or "").port  # (huggingface_hub reads it at import: a bad port was an internal error)
    except ValueError as e:
        raise UsageError(
            f"HF_ENDPOINT {endpoint[:60]!r} is not a URL moespeq can reach ({e}); fix or unset it"
        ) from None
    from huggingface_hub import snapshot_download

    repo = repo_for(model)
    if revision is not None and (not revision.strip() or len(revision) > 256 or "\x00" in revision):
        raise UsageError(f"--revision {revision[:40]!r} is not a branch, tag or commit name")
    if local_dir is not None:
        check_local_dir(Path(local_dir), repo)
    kwargs = dict(
        repo_id=repo,
        revision=revision,
        allow_patterns=CONFIG_FILES if config_only else RUN_FILES,
        ignore_patterns=TOP_LEVEL_ONLY,
        local_dir=str(local_dir) if local_dir else None,
        cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        endpoint=os.environ.get("HF_ENDPOINT") or None,
    )
    with hub_errors(repo, revision, local_dir):
        from huggingface_hub import constants

        from moespeq_cli.model_ref import cached_snapshot

        offline = constants.HF_HUB_OFFLINE  # then a pull can only find what is here
        if local_dir is not None:
            where = Path(local_dir) if pulled_repo(Path(local_dir)) == repo else None
        else:
            where = cached_snapshot(repo, revision)
        # pulled before, and (unless only the config is asked for) with weights: checked then
        here = where is not None and (config_only or any(where.glob("*.safetensors")))
        if offline and local_dir is not None and where is None:
            raise HubError(
                f"cannot reach the hub to download {repo} (HF_HUB_OFFLINE is set), and --local-dir {local_dir} "
                "holds no pull of it; unset HF_HUB_OFFLINE"
            )
        if not offline and not here:  # (another tool's pull: run says what it lacks)
            check_hub_resolves(repo)
            preflight(repo, revision, config_only)
        if local_dir is not None and not offline:
            record_pull(Path(local_dir), repo)
        remove_partial_downloads(repo, local_dir)
        path = Path(download(snapshot_download, kwargs))
        why = not_whole(path, config_only)
        if why is not None and not offline:
            # huggingface_hub keeps a cached file it has, whole or not: the weights cut short
            # (a copy interrupted outside it, a full disk) and JSON files that do not parse
            # are fetched again (a missing file it would have fetched, had it reached the hub)
            again = damaged_downloads(path)
            if again:
                try:
                    download(snapshot_download, dict(kwargs, allow_patterns=again, force_download=True))
                except OSError:
                    raise  # (the disk: said as such)
                except Exception:  # noqa: BLE001 - the hub unreachable (huggingface_hub 2.5 wraps it in a
                    pass  # ValueError, "Force download failed"): what is here is not whole, said below
                why = not_whole(path, config_only)
    if why is not None:
        fetch = (
            "unset HF_HUB_OFFLINE (it is set) and run the same command again"
            if offline
            else "the hub did not make it whole (if it was unreachable: check the network, then run the same command again)"
        )
        raise HubError(f"the pull of {repo} is not whole: {why}; {fetch}")
    return path


def not_whole(path: Path, config_only: bool):
    """Why what a pull left in ``path`` is not what a run opens, a ``CheckpointError``
    (None: it is): huggingface_hub hands back the cached snapshot when the hub cannot be
    reached, whole or not (a shard missing or cut short, a damaged config or index), and
    the pull said it succeeded."""
    from moespeq_cli.errors import CheckpointError
    from moespeq_cli.local_models import damaged_weights, open_problem
    from moespeq_cli.models.checkpoint import read_config

    if config_only:
        try:
            read_config(path)
        except CheckpointError as err:
            return err
        return None
    damaged = damaged_weights(path)  # (sizes: what opening reads only the headers of)
    return open_problem(path) or (CheckpointError(damaged) if damaged else None)


def damaged_downloads(path: Path) -> list[str]:
    """The files of the snapshot ``path`` a new download would mend: weights cut short or
    with a broken header, and JSON files that do not parse."""
    from moespeq_cli.local_models import damaged_files

    names = [name for name, reason in damaged_files(path) if reason.endswith("pull again")]
    for f in sorted(path.glob("*.json")):
        try:
            json.loads(f.read_bytes())
        except ValueError:
            names.append(f.name)
        except OSError:
            pass
    return names


def check_hub_resolves(repo: str) -> None:
    """Refuse at once where the hub's host name does not resolve (no network, no DNS):
    huggingface_hub retries a failed connection with back-off, about 25 s of silence
    before the same error. Behind a proxy (the environment's or the system's, as the HTTP
    stack finds it, unless the host bypasses it) the proxy resolves it: nothing is checked."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    try:
        url = urlsplit(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    except ValueError:  # (HF_ENDPOINT was checked by ``pull``)
        return
    if not host or (urllib.request.getproxies() and not urllib.request.proxy_bypass(host)):
        return
    try:
        socket.getaddrinfo(host, port)
    except UnicodeError:
        return
    except socket.gaierror as err:
        raise HubError(
            f"cannot reach the hub to download {repo}: {host} does not resolve ({err.strerror}); check the "
            "network"
            + (" and HF_ENDPOINT" if os.environ.get("HF_ENDPOINT") else "")
            + ", then run the same command again"
        ) from None


def preflight(repo: str, revision: str | None, config_only: bool) -> None:
    """Refuse, before anything is downloaded, a repository moespeq cannot run: no
    config.json at its top level, no safetensors weights there (a run's pull), or a
    config.json whose ``model_type`` no family here implements (read from a temporary
    copy, so nothing is left in the cache)."""
    import tempfile

    from huggingface_hub import HfApi, hf_hub_download

    from moespeq_cli.errors import CheckpointError, UnsupportedModelError
    from moespeq_cli.models import ARCHITECTURES, family, language_config
    from moespeq_cli.models.checkpoint import read_config

    endpoint = os.environ.get("HF_ENDPOINT") or None
    files = [f for f in HfApi(endpoint=endpoint).list_repo_files(repo, revision=revision) if "/" not in f]
    if "config.json" not in files:
        raise UnsupportedModelError(
            f"{repo} has no config.json at its top level: not a Hugging Face transformers checkpoint moespeq runs"
        )
    if not config_only and not any(f.endswith(".safetensors") for f in files):
        held = sorted({Path(f).suffix for f in files if Path(f).suffix in (".bin", ".pt", ".pth", ".gguf")})
        what = f" (it holds {', '.join(held)} files)" if held else ""
        never = " and never unpickles" if set(held) & {".bin", ".pt", ".pth"} else ""
        raise UnsupportedModelError(
            f"{repo} has no safetensors weights{what}; moespeq reads safetensors only{never} -- "
            "use a safetensors revision or convert it"
        )
    with tempfile.TemporaryDirectory(prefix="moespeq-pull-") as tmp:
        path = hf_hub_download(repo, "config.json", revision=revision, local_dir=tmp, endpoint=endpoint)
        try:
            raw, _ = language_config(read_config(Path(path).parent))
        except CheckpointError:
            raise UnsupportedModelError(
                f"{repo}'s config.json is not a JSON object moespeq can read; nothing was downloaded"
            ) from None
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise UnsupportedModelError(f"{repo}'s config.json names no model_type; nothing was downloaded")
    if family(model_type) is None:
        raise UnsupportedModelError(
            f"{repo} is a {model_type!r} model, not an architecture moespeq runs "
            f"(families: {', '.join(sorted(ARCHITECTURES))}); nothing was downloaded"
        )
    if not config_only and "tokenizer.json" not in files:
        raise UnsupportedModelError(
            f"{repo} has no tokenizer.json (the fast tokenizer moespeq reads); nothing was downloaded"
        )


@contextlib.contextmanager
def hub_errors(repo: str, revision: str | None, local_dir: Path | None):
    """Every hub failure as one line that says what to do."""
    from huggingface_hub import errors as e
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its own warnings (a tree cache it could not write) are ours to say
    try:
        yield
    except MoespeqError:
        raise
    except e.HFValidationError as err:
        raise UsageError(f"{str(err).splitlines()[0][:160]}; check the model id and --revision") from None
    except e.GatedRepoError:
        raise HubError(
            f"{repo} is gated: accept its license at https://huggingface.co/{repo}, then log in with "
            "`hf auth login` (or set HF_TOKEN)"
        ) from None
    except e.RevisionNotFoundError:
        raise UsageError(f"{repo} has no revision {revision!r}; check the branch, tag or commit") from None
    except e.RepositoryNotFoundError:
        raise UnknownModelError(
            f"{repo} was not found on the hub (or it is private: log in with `hf auth login`)"
        ) from None
    except e.LocalEntryNotFoundError:
        from huggingface_hub import constants

        offline = bool(constants.HF_HUB_OFFLINE)  # the environment as huggingface_hub read it
        raise HubError(
            f"cannot reach the hub to download {repo}, and it is not in the cache; "
            + ("unset HF_HUB_OFFLINE (it is set)" if offline else "check the network")
        ) from None
    except e.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubError(
                f"the hub refused access to {repo} ({status}); log in with `hf auth login` or set HF_TOKEN"
            ) from None
        raise HubError(
            f"download of {repo} failed ({err.__class__.__name__}: {str(err).splitlines()[0]}); {AGAIN}"
        ) from None
    except OSError as err:
        where = local_dir or os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        elsewhere = "give --local-dir" if local_dir else "point HF_HUB_CACHE (or HF_HOME) at"
        if err.errno == errno.ENOSPC:
            raise HubError(
                f"no space left on the disk holding {where} while downloading {repo}; free some space "
                f"(or {elsewhere} a larger disk), then run the same command again"
            ) from None
        if err.errno == errno.ENOENT:  # a file of the download gone under it (a cache cleaned meanwhile)
            raise HubError(
                f"{err.filename or 'a file'} vanished while downloading {repo} into {where} (did another "
                f"process clean it?); {AGAIN}"
            ) from None
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST):
            raise HubError(
                f"cannot write the download of {repo} into {where} ({err.strerror}): it is not a writable "
                f"directory; {elsewhere} one that is"
            ) from None
        raise HubError(f"download of {repo} was interrupted ({err.__class__.__name__}); {AGAIN}") from None
    except ConnectionError as err:
        raise HubError(f"download of {repo} was interrupted ({err.__class__.__name__}); {AGAIN}") from None
    except Exception as err:  # noqa: BLE001 - the HTTP stack's own errors (httpx, ...)
        raise HubError(
            f"download of {repo} failed ({err.__class__.__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}); "
            "check HF_ENDPOINT and the network, then run the same command again"
        ) from None
