"""Resolve MODEL (an alias, a hub id, a local directory, or nothing for the built-in demo)
to a local checkpoint directory. Resolution never touches the network: hub ids and
aliases are looked up in the standard Hugging Face cache that ``moespeq pull`` fills."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from moespeq_cli.errors import CheckpointError, UnknownModelError, UsageError
from moespeq_cli.fs import is_regular, kind, shown
from moespeq_cli.text import did_you_mean

if TYPE_CHECKING:
    from moespeq_cli.runtime.planning.hardware import HardwareProfile

DEMO = "demo"
DEMO_DIR = Path(__file__).parent / "assets" / "demo"
CONFIGS_DIR = Path(__file__).parent / "assets" / "configs"  # each alias's config.json, for `plan`
# The demo's default device budget: its fixed part and 4-bit draft (about 21 MiB) plus
# a few slots, so that most experts stay in host memory and the run shows offloading.
DEMO_VRAM = "24MiB"


def default_vram(name: str, vram: str | None, hardware: HardwareProfile | None, backend: str | None) -> str | None:
    """``--vram`` as given, or the demo's own budget when the demo runs on a (real or
    simulated) device without --vram: the same whether or not --hardware is spelled out
    (the profile prices the run, the budget stays the demo's). A ``kind: cpu`` profile
    takes no --vram (its budget is --ram)."""
    if name != DEMO or vram is not None or backend == "cpu" or (hardware is not None and hardware.kind == "cpu"):
        return vram
    return DEMO_VRAM


# alias -> (hub id, approximate bf16 download size in GB)
ALIASES: dict[str, tuple[str, float]] = {
    "mixtral": ("mistralai/Mixtral-8x7B-Instruct-v0.1", 93.4),
    "phi-moe": ("microsoft/Phi-3.5-MoE-instruct", 83.8),
    "qwen-moe": ("Qwen/Qwen1.5-MoE-A2.7B-Chat", 28.6),
    "qwen3-moe": ("Qwen/Qwen3-30B-A3B", 61.1),
    "olmoe": ("allenai/OLMoE-1B-7B-0924-Instruct", 13.8),
    "deepseek-lite": ("deepseek-ai/DeepSeek-V2-Lite-Chat", 31.4),
    "gpt-oss-20b": ("openai/gpt-oss-20b", 13.8),  # MXFP4 experts, as published
    "gpt-oss-120b": ("openai/gpt-oss-120b", 65.3),
    "deepseek-v3": ("deepseek-ai/DeepSeek-V3-0324", 688.6),  # block FP8, as published
    "kimi-k2": ("moonshotai/Kimi-K2-Instruct-0905", 1029.0),  # block FP8: computed from the config
    "qwen3-next": ("Qwen/Qwen3-Next-80B-A3B-Instruct", 159.3),  # bf16: computed from the config
    # bf16, computed from the config (the files' multi-token-prediction layer, ~2%, not counted)
    "glm-4.7": ("zai-org/GLM-4.7", 705.6),
    "glm-4.5-air": ("zai-org/GLM-4.5-Air", 213.7),
    # its bundled config: the shapes of transformers' Glm4MoeLiteConfig defaults (MLA, 64
    # experts top-4: 29.9B, "30B-A3B" in its model card); the published file could not be
    # read here (no hub), so token ids and rotary base are left out (a pull brings them)
    "glm-4.7-flash": ("zai-org/GLM-4.7-Flash", 59.9),
    # bf16, computed from the language model's config (the vision tower and Qwen's
    # multi-token-prediction layer, about 2-5%, not counted)
    "qwen3.5-moe": ("Qwen/Qwen3.5-35B-A3B", 69.3),
    "qwen3.6-moe": ("Qwen/Qwen3.6-35B-A3B", 69.3),
    "gemma-4-26b": ("google/gemma-4-26B-A4B-it", 51.9),
}


def no_config(where: str) -> str:
    return f"{where} has no config.json; point at a Hugging Face model directory (or `moespeq pull` it)"


def check_named(model: str | None) -> None:
    """An empty MODEL (an unset ``$MODEL`` in a script) is not the current directory."""
    if model is not None and not model.strip():
        raise UsageError("MODEL is empty; give an alias, a hub id or a checkpoint directory (none: the demo)")


def resolve(model: str | None) -> tuple[str, Path]:
    """-> (display name, checkpoint directory)."""
    check_named(model)
    if model is None or model == DEMO:
        if not (DEMO_DIR / "config.json").is_file():
            raise CheckpointError(
                f"the built-in demo model is missing from this install ({DEMO_DIR}); reinstall moespeq"
            )
        return DEMO, DEMO_DIR
    path = Path(os.path.expanduser(model))
    status = kind(path)
    if status == "a directory":
        if not os.path.lexists(path / "config.json"):  # not a checkpoint: the command line is wrong
            raise UnknownModelError(no_config(shown(model)))
        return model, path
    if model in ALIASES or (looks_like_hub_id(model) and status == "missing"):  # (q/fp8.json: a file)
        repo = ALIASES[model][0] if model in ALIASES else model
        cached = cached_snapshot(repo)
        if cached is None:
            which = model if repo == model else f"{model} ({repo})"
            if why := unreadable_repo(repo):
                raise CheckpointError(f"{which}: {why}; check its permissions")
            raise UnknownModelError(f"{which} is not downloaded; run `moespeq pull {model}` first")
        return model, cached
    if status != "missing" and (status == "file" or status.startswith("a ")):
        raise UnknownModelError(
            f"{shown(model)} is {'a file' if status == 'file' else status}, not a checkpoint directory; "
            "pass the directory that holds config.json"
        )
    if status != "missing":
        raise UnknownModelError(f"checkpoint directory {shown(model)} cannot be read ({status}); check the path")
    if os.sep in model or model.startswith("."):
        raise UnknownModelError(f"checkpoint directory {shown(model)} does not exist; check the path")
    if len(model.split()) > 1:  # `moespeq run "Why is the sky blue?"`, as ollama takes it
        raise UnknownModelError(
            f"unknown model {shown(model)!r}: a model's name has no spaces (a prompt? `run`, `profile`, "
            "`bench` and `plan` take it in -p, after the model's name; `chat` at its prompt; either on standard input)"
        )
    raise UnknownModelError(
        f"unknown model {shown(model)!r}{did_you_mean(model, [DEMO, *ALIASES])}; use {DEMO} (the built-in demo), an alias ({', '.join(ALIASES)}), "
        "a hub id like org/name, or a local directory"
    )


_HUB_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")


def looks_like_hub_id(s: str) -> bool:
    """``org/name`` as the hub spells repository ids: letters, digits, ``._-``, no ``..``
    or ``--``, not starting or ending with ``.`` or ``-``, at most 96 characters."""
    parts = s.split("/")
    return (
        len(parts) == 2 and len(s) <= 96 and all(_HUB_PART.match(p) for p in parts) and ".." not in s and "--" not in s
    )


def cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The cached snapshot of ``repo`` holding a config.json, without any network call."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from moespeq_cli.hub import RUN_FILES

    check_hub_cache()
    try:
        # The same file patterns as `pull`: the cache holds only what a run needs.
        path = Path(
            snapshot_download(
                repo,
                revision=revision,
                local_files_only=True,
                allow_patterns=RUN_FILES,
                cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, FileNotFoundError, OSError, ValueError):
        path = None
    if path is not None and is_regular(path / "config.json"):  # (a snapshot this user cannot read: none)
        return path
    return newest_snapshot(repo) if revision is None else None


def unreadable_repo(repo: str) -> str | None:
    """Why the cached ``repo`` cannot be read (its folder, its snapshots or one of them
    closed to this user: ``chmod 000``), or None: said as such, not as "not downloaded"."""
    d = repo_dir(repo)
    for where in (d, d / "snapshots"):
        if not os.path.lexists(where):
            return None
        try:
            entries = os.listdir(where)
        except OSError as e:
            return f"{shown(where)} cannot be read ({(e.strerror or 'error').lower()})"
    for name in entries:
        try:
            os.listdir(d / "snapshots" / name)
        except NotADirectoryError:
            continue
        except OSError as e:
            return f"{shown(d / 'snapshots' / name)} cannot be read ({(e.strerror or 'error').lower()})"
    return None


def hub_cache() -> Path:
    """The Hugging Face cache's directory ($HF_HUB_CACHE, else huggingface_hub's default)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def check_hub_cache() -> Path:
    """``hub_cache()``, where it is a directory or not there yet; else one line saying
    what it is (a file, a symlink loop: huggingface_hub's own resolve raised "internal
    error: RuntimeError") and what to do."""
    from moespeq_cli.errors import MoespeqError
    from moespeq_cli.fs import kind

    cache = hub_cache()
    what = kind(cache)
    if what not in ("missing", "a directory"):
        if what == "file":
            what = "a file"
        is_what = f"is {what}" if what.startswith(("a ", "not ")) else f"cannot be used ({what})"
        raise MoespeqError(
            f"the Hugging Face cache {shown(cache)} {is_what}; fix it, or point HF_HUB_CACHE (or HF_HOME) at a directory"
        )
    return cache


def repo_dir(repo: str) -> Path:
    """Where the Hugging Face cache keeps ``org/name``: ``models--org--name``."""
    return hub_cache() / f"models--{repo.replace('/', '--')}"


def repo_of(dirname: str) -> str | None:
    """``models--org--name`` -> ``org/name`` (None for any other name: a dataset's, a lock)."""
    parts = dirname.split("--")
    return f"{parts[1]}/{parts[2]}" if len(parts) == 3 and parts[0] == "models" else None


def snapshot_repo(path: Path) -> str | None:
    """The hub id whose snapshot ``path`` is in the Hugging Face cache
    (``models--ORG--NAME/snapshots/REV``), or None where it is not one."""
    return repo_of(path.parent.parent.name) if path.parent.name == "snapshots" else None


def newest_snapshot(repo: str) -> Path | None:
    """A repository pulled only at another revision than main (``pull --revision dev``):
    its most recently written snapshot holding a config.json, or None."""
    snapshots = repo_dir(repo) / "snapshots"
    try:
        found = [d for d in snapshots.iterdir() if is_regular(d / "config.json")]
        return max(found, key=lambda d: d.stat().st_mtime, default=None)
    except OSError:
        return None


def alias_of(repo: str) -> str | None:
    """The alias naming a hub repository (the first, where several do), or None."""
    return next((alias for alias, (r, _) in ALIASES.items() if r == repo), None)


def resolve_config(model: str | None) -> tuple[str, dict, str]:
    """-> (display name, raw config.json, where it came from), for ``moespeq plan``: a
    checkpoint directory, a pulled repository (``pull --config-only`` is enough), an
    alias's bundled config, or a config file itself (a model's config.json saved from its
    page: ``plan ~/Downloads/config.json``) -- never the network, never a weight."""
    from moespeq_cli.models.checkpoint import read_config, read_json

    check_named(model)
    given = Path(os.path.expanduser(model)) if model is not None else None
    if given is not None and given.suffix == ".json" and kind(given) == "file":
        return model, read_json(given, "fix the file"), str(given)

    def bundled(alias: str) -> dict:
        path = CONFIGS_DIR / f"{alias}.json"
        return read_json(path, "reinstall moespeq", missing=f"{path} is missing from this install; reinstall moespeq")

    if model in ALIASES:
        repo = ALIASES[model][0]
        cached = cached_snapshot(repo)
        if cached is not None:
            return model, read_config(cached), str(cached / "config.json")
        return model, bundled(model), f"bundled config of {repo}"
    if model is not None and kind(Path(os.path.expanduser(model))) == "missing" and looks_like_hub_id(model):
        cached = cached_snapshot(model)
        alias = alias_of(model)
        if cached is None and alias is not None:  # an alias's repository by its id: its bundled config
            return model, bundled(alias), f"bundled config of {model}"
        if cached is None:
            if why := unreadable_repo(model):
                raise CheckpointError(f"{model}: {why}; check its permissions")
            raise UnknownModelError(
                f"{model} is not downloaded; `moespeq pull {model} --config-only` fetches just its config"
            )
        return model, read_config(cached), str(cached / "config.json")
    if given is not None and model != DEMO and kind(given) == "file":  # (an alias wins, as in run)
        raise UnknownModelError(
            f"{shown(model)} is a file, neither a checkpoint directory nor a model's config .json; pass the "
            "directory that holds config.json, or that config.json"
        )
    name, path = resolve(model)
    return name, read_config(path), str(path / "config.json")
