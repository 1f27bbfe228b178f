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


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, path: Path, config: dict):
        from tokenizers import Tokenizer as HFTokenizer

        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"{path} has no tokenizer.json; moespeq needs the fast-tokenizer file")
        try:
            self.tok = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{tok_file} cannot be read ({e}); download the checkpoint again") from None
        self.tok_config = read_json(path / "tokenizer_config.json", "download the checkpoint again")
        gen = read_json(path / "generation_config.json", "download the checkpoint again")
        self.chat_template: str | None = self.tok_config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default")
        eos = gen.get("eos_token_id", config.get("eos_token_id"))
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        eos_text = _token_text(self.tok_config.get("eos_token"))
        if eos_text is not None and self.tok.token_to_id(eos_text) is not None:
            eos_ids.append(self.tok.token_to_id(eos_text))
        self.eos_ids: set[int] = {int(i) for i in eos_ids}
        self.bos_token = _token_text(self.tok_config.get("bos_token")) or ""
        self.eos_token = eos_text or ""

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if chat:
            if not self.chat_template:
                raise UsageError("this model has no chat template; drop --chat")
            return self.tok.encode(self.render_chat(text), add_special_tokens=False).ids
        return self.tok.encode(text).ids

    def render_chat(self, text: str) -> str:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg: str):
            raise jinja2.TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=[{"role": "user", "content": text}],
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as e:
            raise CheckpointError(f"the model's chat template failed ({e}); use --no-chat") from None

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
