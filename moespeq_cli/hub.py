"""Downloads from the Hugging Face Hub (``moespeq pull``).

Only the files a run needs (safetensors weights and index, config, tokenizer, generation
config) go into the standard Hugging Face cache, so other tools reuse them and later
commands resolve the alias or id without the network. huggingface_hub resumes an
interrupted download from its ``.incomplete`` file. Every hub failure becomes one line
that says what to do.
"""

from __future__ import annotations

import os
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
]
CONFIG_FILES = ["config.json", "generation_config.json"]


class HubError(MoespeqError):
    """The hub refused or could not be reached."""


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
    if local_dir is not None and os.path.lexists(local_dir) and not Path(local_dir).is_dir():
        raise UsageError(f"--local-dir {local_dir} exists and is not a directory; give a directory")
    kwargs = dict(
        repo_id=repo,
        revision=revision,
        allow_patterns=CONFIG_FILES if config_only else RUN_FILES,
        local_dir=str(local_dir) if local_dir else None,
        cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        endpoint=os.environ.get("HF_ENDPOINT") or None,
    )
    try:
        path = Path(snapshot_download(**kwargs))
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
        raise HubError(
            f"cannot reach the hub to download {repo}, and it is not in the cache; check the network "
            "(or unset HF_HUB_OFFLINE)"
        ) from None
    except e.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubError(
                f"the hub refused access to {repo} ({status}); log in with `hf auth login` or set HF_TOKEN"
            ) from None
        raise HubError(
            f"download of {repo} failed ({err.__class__.__name__}: {str(err).splitlines()[0]}); run the "
            "same command again to resume"
        ) from None
    except (OSError, ConnectionError) as err:
        raise HubError(
            f"download of {repo} was interrupted ({err.__class__.__name__}); run the same command again to resume"
        ) from None
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
