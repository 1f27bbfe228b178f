"""Downloads from the Hugging Face Hub (``moespeq pull``).

Only the files a run needs (safetensors weights and index, config, tokenizer, generation
config) go into the standard Hugging Face cache, so other tools reuse them and later
commands resolve the alias or id without the network. An interrupted pull keeps the
files it finished (huggingface_hub renames each into place when it is whole) and the
same command fetches the rest. A dropped connection is resumed within the pull (a range
request for the rest), but a file a killed or interrupted pull cut short starts over
(huggingface_hub 2.x writes each download to a file of its own and does not take it up
again), and the partial file a killed pull left is removed by the next pull once it has not
grown for ``STALE_S``. Ctrl-C stops a pull at once. ``--local-dir`` takes a new or empty
directory, or one an earlier pull wrote (never a directory of the user's files, which a
download would overwrite and mix with another model's). Every hub failure becomes one
line that says what to do.
"""

from __future__ import annotations

import errno
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


def check_local_dir(local_dir: Path) -> None:
    """``--local-dir`` must be new, empty, or written by an earlier pull (it holds
    huggingface_hub's ``.cache/huggingface``): a directory of the user's own files is never
    downloaded over."""
    if not os.path.lexists(local_dir):
        return
    if not local_dir.is_dir():
        raise UsageError(f"--local-dir {local_dir} exists and is not a directory; give a directory")
    try:
        names = [p.name for p in local_dir.iterdir()]
    except OSError as err:
        raise UsageError(f"--local-dir {local_dir} cannot be read ({err.strerror}); give another directory") from None
    if names and not (local_dir / ".cache" / "huggingface").is_dir():
        raise UsageError(
            f"--local-dir {local_dir} already holds files that no pull wrote; the download would overwrite "
            "and mix with them: give a new or empty directory"
        )


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
    from moespeq_cli.model_ref import ALIASES, looks_like_hub_id

    if model in ALIASES:
        return ALIASES[model][0]
    if not looks_like_hub_id(model):
        raise UnknownModelError(
            f"unknown model {model!r}; use an alias ({', '.join(ALIASES)}) or a hub id like org/name"
        )
    return model


def pull(model: str, revision: str | None = None, local_dir: Path | None = None, config_only: bool = False) -> Path:
    """Download MODEL's run files (or only its config); returns the local directory."""
    from huggingface_hub import errors as e
    from huggingface_hub import snapshot_download

    repo = repo_for(model)
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise UsageError(f"HF_ENDPOINT {endpoint[:60]!r} is not an http(s) URL; fix or unset it")
    if revision is not None and (not revision.strip() or len(revision) > 256 or "\x00" in revision):
        raise UsageError(f"--revision {revision[:40]!r} is not a branch, tag or commit name")
    if local_dir is not None:
        check_local_dir(Path(local_dir))
    kwargs = dict(
        repo_id=repo,
        revision=revision,
        allow_patterns=CONFIG_FILES if config_only else RUN_FILES,
        local_dir=str(local_dir) if local_dir else None,
        cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        endpoint=os.environ.get("HF_ENDPOINT") or None,
    )
    remove_partial_downloads(repo, local_dir)
    try:
        path = Path(download(snapshot_download, kwargs))
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
        if err.errno == errno.ENOSPC:
            raise HubError(
                f"no space left on the disk holding {where} while downloading {repo}; free some space "
                "(or set HF_HOME to a larger disk), then run the same command again"
            ) from None
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise HubError(
                f"cannot write the download of {repo} into {where} ({err.strerror}); "
                "give a writable --local-dir or HF_HOME"
            ) from None
        raise HubError(f"download of {repo} was interrupted ({err.__class__.__name__}); {AGAIN}") from None
    except ConnectionError as err:
        raise HubError(f"download of {repo} was interrupted ({err.__class__.__name__}); {AGAIN}") from None
    except Exception as err:  # noqa: BLE001 - the HTTP stack's own errors (httpx, ...)
        raise HubError(
            f"download of {repo} failed ({err.__class__.__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}); "
            "check HF_ENDPOINT and the network, then run the same command again"
        ) from None
    if not config_only and not any(path.glob("*.safetensors")):
        raise HubError(
            f"{repo} has no safetensors weights (pickle .bin only); moespeq never unpickles -- "
            "use a safetensors revision or convert it"
        )
    return path
