"""Reasoning told apart from the answer: gpt-oss's harmony channels, and the think blocks
of Qwen3, GLM-4.x, DeepSeek-R1 and the other models that reason in ``<think>...</think>``.

gpt-oss answers in channels: ``<|channel|>analysis<|message|>`` its reasoning ``<|end|>``,
then ``<|start|>assistant<|channel|>final<|message|>`` the answer ``<|return|>`` (tool
calls go to ``commentary``). Decoded with the special tokens skipped, the markers vanish
and the channel names and the reasoning run into the answer ("analysisThe user greets
me...assistantfinalHello!"). ``ChannelRouter`` follows the markers token by token, so that
the answer shown (``chat``, the server's ``content``) is the final channel and the rest is
reasoning (the server's ``reasoning_content``). Only an answer to a prompt rendered by
the chat template is split (the template ends the prompt outside any message; a raw
prompt may end anywhere), and a tokenizer without the markers gets no router: every token
is the answer.

``ThinkRouter`` does the same for a think block: its text is reasoning, the rest the
answer, the markers neither (Qwen3's are not special tokens: decoded, they would show).
Where the block starts follows the prompt: a template that opens it (DeepSeek-R1's, the
Qwen3 thinking models') leaves the answer to begin inside it; one that closes an empty
block (Qwen3's ``enable_thinking: false``) or none leaves it to the model.
"""

from __future__ import annotations

from moespeq_cli.tokenizer import StreamDecoder

START, CHANNEL, MESSAGE, END = "<|start|>", "<|channel|>", "<|message|>", "<|end|>"
FINAL = "final"
THINK, UNTHINK = "<think>", "</think>"
REASONING = "analysis"  # a think block's channel


class ChannelRouter:
    """Token by token: which channel a generated token's text belongs to, or None for the
    markers and the headers between them (the role after ``<|start|>``, the channel's
    name after ``<|channel|>``)."""

    closed = False  # (``ThinkRouter``'s: harmony's answer needs no trimming)

    def __init__(self, ids: dict[str, int], decode):
        self.start, self.channel_id, self.message, self.end = (ids[m] for m in (START, CHANNEL, MESSAGE, END))
        self.decode = decode
        self.mode = "body"  # body, role (after <|start|>) or header (after <|channel|>)
        self.channel = FINAL  # text before any marker is the answer (a model that skips them)
        self.header: list[int] = []
        self.messages = 0  # messages begun (<|message|> seen)

    @classmethod
    def of(cls, tokenizer) -> ChannelRouter | None:
        ids = {m: tokenizer.tok.token_to_id(m) for m in (START, CHANNEL, MESSAGE, END)}
        if any(i is None for i in ids.values()):
            return None
        return cls(ids, tokenizer.decode)

    def push(self, token: int) -> str | None:
        if token == self.start:
            self.mode = "role"
        elif token == self.channel_id:
            self.mode, self.header = "header", []
        elif token == self.message:
            if self.mode == "header":
                words = self.decode(self.header).split()
                self.channel = words[0] if words else FINAL
            self.mode = "body"
            self.messages += 1
        elif token == self.end:
            self.mode, self.channel = "body", FINAL  # <|start|> comes next; text without it is shown
        elif self.mode == "header":
            self.header.append(token)
        elif self.mode == "body":
            return self.channel
        return None


class ThinkRouter:
    """Token by token: ``REASONING`` inside a think block, ``FINAL`` outside, None for the
    markers (module docstring); ``messages``: blocks begun."""

    def __init__(self, open_id: int, close_id: int, inside: bool):
        self.open, self.close = open_id, close_id
        self.channel = REASONING if inside else FINAL
        self.messages = int(inside)
        self.closed = False  # the last token closed a block

    @classmethod
    def of(cls, tokenizer, prompt_ids: list[int]) -> ThinkRouter | None:
        """A router where the tokenizer has both markers as tokens, starting inside a
        block where the prompt ends in an open one (nothing but whitespace after it)."""
        ids = [tokenizer.tok.token_to_id(m) for m in (THINK, UNTHINK)]
        if None in ids:
            return None
        inside = False
        for t in reversed(prompt_ids[-8:]):  # "<think>\n": the marker, then a newline or two
            if t in ids:
                inside = t == ids[0]
                break
            if tokenizer.tok.decode([t], skip_special_tokens=False).strip():  # a special token is no whitespace
                break
        return cls(*ids, inside)

    def push(self, token: int) -> str | None:
        self.closed = False
        if token == self.open:
            self.channel = REASONING
            self.messages += 1
            return None
        if token == self.close:
            self.channel, self.closed = FINAL, True
            return None
        return self.channel


class Split:
    """A generated answer's text as it streams, the answer and the reasoning apart
    (``channels`` false or no markers: all of it the answer). Each reasoning message is
    decoded on its own, a line between two (a tool call's arguments after the analysis)."""

    def __init__(self, tokenizer, channels: bool, prompt_ids: list[int] = ()):
        """``prompt_ids``: where a think block starts follows the prompt (``ThinkRouter``)."""
        self.tokenizer = tokenizer
        self.router = (ChannelRouter.of(tokenizer) or ThinkRouter.of(tokenizer, list(prompt_ids))) if channels else None
        # after a think block the answer begins after the newlines the model puts there
        # (a line's indentation kept)
        self.trim = False
        self.answer = StreamDecoder(tokenizer)
        self.thoughts = None  # the reasoning message's decoder
        self.message = -1
        self.said = False  # some reasoning given already
        self.lead = False
        # a message's trailing newlines (before its </think> or <|end|>) are held back
        # until more of its text follows
        self.held = ""

    def push(self, token: int) -> tuple[str, str]:
        """-> (the answer's new text, the reasoning's)."""
        channel = FINAL if self.router is None else self.router.push(token)
        if self.router is not None and self.router.closed:
            self.trim = True
        if channel == FINAL:
            piece = self.answer.push(token)
            if self.trim:
                piece = piece.lstrip("\r\n")
                self.trim = not piece
            return piece, ""
        if channel is None:
            return "", ""
        text = ""
        if self.router.messages != self.message:  # a reasoning message begins
            text = self._end_message()
            text += "\n" if self.said or text else ""
            self.message, self.thoughts = self.router.messages, StreamDecoder(self.tokenizer)
            self.lead = True  # a block's reasoning begins after its first newline
        piece = self.thoughts.push(token)
        if self.lead:
            piece = piece.lstrip("\r\n")
            self.lead = not piece
        piece = self.held + piece
        kept = piece.rstrip("\r\n")
        self.held = piece[len(kept) :]
        text += kept
        self.said = self.said or bool(text)
        return "", text

    def _end_message(self) -> str:
        """The rest of the reasoning message, its trailing newlines dropped."""
        rest = self.thoughts.flush() if self.thoughts is not None else ""
        rest, self.held = (self.held + rest).rstrip("\r\n") if rest else "", ""
        return rest

    def flush(self) -> tuple[str, str]:
        return self.answer.flush(), self._end_message()
