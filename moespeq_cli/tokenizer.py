"""The checkpoint's tokenizer (tokenizer.json via ``tokenizers``), its chat template and
its end-of-sequence ids.

Chat templates: ``tokenizer_config.json``'s ``chat_template`` is a Jinja2 template. With
``chat=True`` the prompt becomes one user message rendered through it (with the
generation prompt appended); the rendered text already holds the special tokens, so it
is encoded without adding them again. With ``chat=False`` the prompt is encoded as is,
with the tokenizer's own post-processor (which adds BOS where the model expects it).
"""

from __future__ import annotations

from pathlib import Path

from moespeq_cli.errors import CheckpointError, UsageError
from moespeq_cli.models.checkpoint import read_json

TOKENIZER_LIMIT = 512 * 2**20


def _token_text(value, field: str, source: Path) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{source}: field {field!r} must be a string, got {value!r}; fix the file")
    return value


def _chat_template(value, source: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates
    (take the default one)."""
    if isinstance(value, list):
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in value):
            raise CheckpointError(f"{source}: 'chat_template' as a list must hold {{name, template}} entries; fix it")
        value = {t["name"]: t.get("template") for t in value}.get("default")
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{source}: field 'chat_template' must be a string; fix the file or use --no-chat")
    return value


class Tokenizer:
    def __init__(self, path: Path, config: dict):
        from tokenizers import Tokenizer as HFTokenizer

        from moespeq_cli.fs import file_status, read_text
        from moespeq_cli.models.schema import check_token_ids

        tok_file = path / "tokenizer.json"
        if file_status(tok_file)[0] == "missing":
            raise CheckpointError(f"{path} has no tokenizer.json; moespeq needs the fast-tokenizer file")
        text = read_text(tok_file, TOKENIZER_LIMIT, "tokenizer file")
        try:
            self.tok = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(
                f"{tok_file} cannot be read ({str(e)[:120]}); download the checkpoint again"
            ) from None
        cfg_file, gen_file = path / "tokenizer_config.json", path / "generation_config.json"
        self.tok_config = read_json(cfg_file, "download the checkpoint again")
        gen = read_json(gen_file, "download the checkpoint again")
        self.chat_template: str | None = _chat_template(self.tok_config.get("chat_template"), cfg_file)
        if gen.get("eos_token_id") is not None:
            check_token_ids(str(gen_file), "eos_token_id", gen["eos_token_id"])
        eos = gen.get("eos_token_id", config.get("eos_token_id"))
        eos_ids = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
        eos_text = _token_text(self.tok_config.get("eos_token"), "eos_token", cfg_file)
        if eos_text is not None and self.tok.token_to_id(eos_text) is not None:
            eos_ids.append(self.tok.token_to_id(eos_text))
        self.eos_ids: set[int] = {int(i) for i in eos_ids}
        self.bos_token = _token_text(self.tok_config.get("bos_token"), "bos_token", cfg_file) or ""
        self.eos_token = eos_text or ""
        self.template_source = cfg_file

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if chat:
            if not self.chat_template:
                raise UsageError("this model has no chat template; drop --chat")
            return self.tok.encode(self.render_chat(text), add_special_tokens=False).ids
        return self.tok.encode(text).ids

    def render_chat(self, text: str) -> str:
        from moespeq_cli.chat_template import render

        return render(
            self.chat_template,
            f"the chat template in {self.template_source}",
            messages=[{"role": "user", "content": text}],
            add_generation_prompt=True,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing list of token ids into text increments, holding back a tail that
    ends inside a multi-byte character (decoded as U+FFFD) until it completes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted :], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[self.emitted :], len(text)
        return new
