"""The checkpoint's tokenizer (tokenizer.json via ``tokenizers``), its chat template and
its end-of-sequence ids.

Chat templates: the checkpoint's Jinja2 template (``chat_template.jinja``, else
``tokenizer_config.json``'s ``chat_template``, else ``chat_template.json``'s:
``find_chat_template``). With
``chat=True`` the prompt becomes one user message rendered through it (with the
generation prompt appended); the rendered text already holds the special tokens, so it
is encoded without adding them again. With ``chat=False`` the prompt is encoded as is,
with the tokenizer's own post-processor (which adds BOS where the model expects it).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import tempfile
from pathlib import Path

from moespeq_cli.errors import CheckpointError, MoespeqError, Terminated, UsageError
from moespeq_cli.models.checkpoint import read_json

TOKENIZER_LIMIT = 512 * 2**20
TEMPLATE_LIMIT = 16 * 2**20
AGAIN = "download the checkpoint again"  # what a checkpoint file that cannot be used asks for
NORMALIZER_GROWTH = 32  # NFKC grows a character at most 18-fold


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


def find_chat_template(path: Path, tok_config: dict, cfg_file: Path) -> tuple[str | None, Path]:
    """The checkpoint's chat template and the file it came from, found where transformers
    looks: ``chat_template.jinja`` first (transformers has saved templates there since
    4.50, and most checkpoints of 2025-26 carry one: gpt-oss, Qwen3.5, GLM-4.x), then
    tokenizer_config.json's ``chat_template``; and, for a multimodal checkpoint whose only
    template is its processor's, ``chat_template.json``."""
    from moespeq_cli.fs import file_status, read_text

    jinja = path / "chat_template.jinja"
    if file_status(jinja)[0] != "missing":
        return read_text(jinja, TEMPLATE_LIMIT, "chat template file", remedy=AGAIN), jinja
    template = _chat_template(tok_config.get("chat_template"), cfg_file)
    legacy = path / "chat_template.json"
    if template is None and file_status(legacy)[0] != "missing":
        return _chat_template(read_json(legacy, "download the checkpoint again").get("chat_template"), legacy), legacy
    return template, cfg_file


@contextlib.contextmanager
def rust_call(what: str, remedy: str):
    """Run a `tokenizers` call whose failure must be one line: it raises a bare Exception,
    or panics (PanicException is a BaseException, and Rust's panic hook writes to fd 2
    directly). stderr is captured for the call and its first line joins the message."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except (KeyboardInterrupt, SystemExit, Terminated, MoespeqError):
            raise
        except BaseException as e:  # noqa: BLE001 - see above
            os.dup2(saved, 2)
            captured.seek(0)
            said = [ln for ln in captured.read().decode(errors="replace").splitlines() if ln.strip()]
            detail = str(e).strip() or (said[1] if len(said) > 1 else said[0] if said else type(e).__name__)
            raise CheckpointError(f"{what} ({detail.splitlines()[0][:120]}); {remedy}") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class Tokenizer:
    def __init__(self, path: Path, config: dict):
        from tokenizers import Tokenizer as HFTokenizer

        from moespeq_cli.fs import file_status, read_text
        from moespeq_cli.models.schema import check_token_ids

        tok_file = path / "tokenizer.json"
        if file_status(tok_file)[0] == "missing":
            raise CheckpointError(
                f"{path} has no tokenizer.json; moespeq needs the fast-tokenizer file: download the checkpoint again "
                "with it"
            )
        text = read_text(tok_file, TOKENIZER_LIMIT, "tokenizer file", remedy=AGAIN)
        with rust_call(f"{tok_file} cannot be read", AGAIN):
            self.tok = HFTokenizer.from_str(text)
            # Never truncate a prompt silently, never pad one (a hostile pad_to_multiple_of).
            self.tok.no_truncation()
            self.tok.no_padding()
        cfg_file, gen_file = path / "tokenizer_config.json", path / "generation_config.json"
        self.tok_config = read_json(cfg_file, "download the checkpoint again")
        gen = read_json(gen_file, "download the checkpoint again")
        self.chat_template, self.template_source = find_chat_template(path, self.tok_config, cfg_file)
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
        self.path = path

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The longest token's UTF-8 length: no token covers more bytes of text than this
        (byte-level and metaspace symbols are at least as long as what they stand for)."""
        return max(
            (len(t.encode("utf-8", "surrogatepass")) for t in self.tok.get_vocab(with_added_tokens=True)), default=1
        )

    def min_tokens(self, text: str) -> int:
        """A lower bound on ``len(encode(text))``, from arithmetic alone: lets a prompt far
        beyond the context be refused without tokenizing megabytes."""
        return len(text.encode("utf-8", "surrogatepass")) // max(1, self.max_token_bytes)

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if chat:
            if not self.chat_template:
                raise UsageError("this model has no chat template; drop --chat")
            return self._encode(self.render_chat(text), add_special_tokens=False)
        return self._encode(text)

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self._check_normalizer(text)
        with rust_call(f"{self.path / 'tokenizer.json'} cannot encode the prompt", "the tokenizer is broken"):
            return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def _check_normalizer(self, text: str) -> None:
        """A normalizer is code-like data too: a Replace rule that turns one character into
        thousands would tokenize for minutes. Its growth is measured on every distinct
        character of the text (and on a sample, for multi-character rules) first."""
        norm = self.tok.normalizer
        if norm is None or not text:
            return
        with rust_call(f"{self.path / 'tokenizer.json'}'s normalizer fails", "the tokenizer is broken"):
            counts = collections.Counter(text)
            if len(counts) <= 4096:
                grown = sum(n * len(norm.normalize_str(c)) for c, n in counts.items())
            else:
                grown = len(text)
            sample = text[:4096]
            grown = max(grown, len(norm.normalize_str(sample)) * len(text) // len(sample))
        if grown > NORMALIZER_GROWTH * len(text) + 2**20:
            raise CheckpointError(
                f"{self.path / 'tokenizer.json'}'s normalizer would grow the prompt {grown // len(text)}-fold; "
                "the tokenizer is broken or hostile"
            )

    def render_chat(self, text: str) -> str:
        return self.render_messages([{"role": "user", "content": text}])

    def render_messages(
        self,
        messages: list[dict],
        variables: dict | None = None,
        add_generation_prompt: bool = True,
        continue_final: bool = False,
    ) -> str:
        """A conversation through the chat template, ending with the assistant's turn to
        speak (``add_generation_prompt``), or inside the final (assistant's) message
        (``continue_final``: the template renders a marker in its place, and the prompt is
        what comes before the marker, then the message's text as given: a search for the
        text itself, as transformers does, can match inside the template's own markup, a
        prefill of ``<`` in ``<|im_end|>``); ``variables``: more the template may read (a
        request's ``chat_template_kwargs``, gpt-oss's ``reasoning_effort``), never one of
        these."""
        from moespeq_cli.chat_template import TemplateError, render

        if continue_final:
            *earlier, final = messages
            messages = [*earlier, {**final, "content": PREFILL_MARK}]
        text = render(
            self.chat_template,
            f"the chat template in {self.template_source}",
            **(variables or {}),
            messages=messages,
            tools=None,  # defined and none, as transformers passes them (`tools is not none`)
            documents=None,
            add_generation_prompt=add_generation_prompt and not continue_final,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        if not continue_final:
            return text
        if text.count(PREFILL_MARK) != 1:
            raise TemplateError(
                "the template does not show the final message's text: it cannot be continued", refused=True
            )
        return text[: text.index(PREFILL_MARK)] + final["content"]

    def encode_messages(
        self,
        messages: list[dict],
        variables: dict | None = None,
        add_generation_prompt: bool = True,
        continue_final: bool = False,
    ) -> list[int]:
        """Token ids of a conversation: through the chat template (the options: as
        ``render_messages``), or (a model without one) the turns' text run together, a
        line each, for plain continuation (``continue_final``: the last one's line open)."""
        if self.chat_template:
            text = self.render_messages(messages, variables, add_generation_prompt, continue_final)
            return self._encode(text, add_special_tokens=False)
        text = "".join(m["content"].rstrip("\n") + "\n" for m in messages)
        return self._encode(text[:-1] if continue_final else text)

    def decode(self, ids: list[int]) -> str:
        try:  # per token: no stderr capture here (rust_call), only the error mapping
            return self.tok.decode(ids, skip_special_tokens=True)
        except (KeyboardInterrupt, SystemExit, Terminated):
            raise
        except BaseException as e:  # noqa: BLE001 - tokenizers: bare Exception, or a Rust panic
            raise CheckpointError(
                f"{self.path / 'tokenizer.json'} cannot decode ({str(e)[:120]}); it is broken"
            ) from None


PREFILL_MARK = "\ue000moespeq-final-message\ue001"  # private-use characters: in no message, untouched by templates


class StreamDecoder:
    """Turns a growing list of token ids into text increments, holding back a tail that
    ends inside a multi-byte character (decoded as U+FFFD) until it completes.

    Incremental, as vLLM and TGI detokenize: a step decodes the tokens since the last
    increment with the ones before it (``prefix``, for context: a SentencePiece token's
    leading space, a byte-fallback run), twice, and gives the difference; it decoded
    every token so far at each step (a 16,000-token answer: 35 s of decoding). A
    byte-fallback tokenizer (Llama's, Mistral's) decodes a run of byte tokens whole, one
    U+FFFD a byte where the run is not UTF-8: a character given stays given, the bytes
    after it decoded alone (``stream_text`` is the text these increments make, which
    ``run --json`` reports as the stream printed it)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = self.read = 0  # the context's first token, the first not yet given

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""
        # the context decoded otherwise with the new tokens (a byte-fallback run they
        # continue, invalid): the new tokens alone
        new = text[len(before) :] if text.startswith(before) else self.tokenizer.decode(self.ids[self.read :])
        self.prefix, self.read = self.read, len(self.ids)
        return new


def stream_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The text ``StreamDecoder`` gives for ``ids``, whole."""
    d = StreamDecoder(tokenizer)
    return "".join(d.push(t) for t in ids) + d.flush()
