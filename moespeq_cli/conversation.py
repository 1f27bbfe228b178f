"""A conversation with a loaded engine, shared by ``moespeq chat`` and ``moespeq serve``.

- ``Conversation`` keeps the messages and renders them into prompt ids that fit the
  context, dropping the oldest turns (never the system message or the newest user turn)
  when the history outgrows it;
- ``StopMatcher`` applies stop strings to streamed text: it holds back any tail that
  could be the start of a stop string, so the matched text (and nothing after it) ever
  reaches the user, as OpenAI's API specifies;
- ``complete`` streams one answer: token ids -> text increments through the tokenizer's
  stream decoder and the stop matcher, ending on end-of-sequence, a stop string or the
  token budget (``finish_reason`` "stop" or "length").

With ``reuse`` (chat and serve), an answer starts from the previous one's cache where the
new prompt begins with the same tokens (``Engine.generate(reuse=True)``), so a
conversation's earlier turns are not prefilled again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from moespeq_cli.errors import UsageError


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False
        self.dropped = ""  # once stopped: the text held or pushed from the stop string on, not shown

    def push(self, text: str) -> str:
        """The part of ``text`` (after what was held back) that is safe to show now."""
        if self.stopped:
            return ""
        buf = self.pending + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.pending, self.dropped = True, "", buf[cut:]
            return buf[:cut]
        hold = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


@dataclass
class Answer:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop": end of sequence or a stop string
    reasoning: str = ""  # a harmony model's (gpt-oss) channels other than the final one


def complete(
    engine,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling,
    stops: list[str] | None = None,
    on_text: Callable[[str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    answer: Answer | None = None,
    reuse: bool = False,
    on_reasoning: Callable[[str], None] | None = None,
    channels: bool = False,
) -> Answer:
    """Generate one answer into ``answer`` (a new one by default), streaming its text to
    ``on_text``; ``cancelled()`` is asked after each token (a client that went away). A
    harmony model's (gpt-oss) reasoning goes to ``answer.reasoning`` and ``on_reasoning``,
    its final channel is the answer (harmony.py), with ``channels`` (the prompt rendered
    by the chat template); stop strings apply to the answer.
    Ctrl-C (KeyboardInterrupt) closes the generator and propagates; what was generated
    so far is in the ``answer`` the caller passed."""
    from moespeq_cli.harmony import Split

    split, stop = Split(engine.tokenizer, channels, prompt_ids), StopMatcher(stops or [])
    answer = answer if answer is not None else Answer()
    events: Iterator = engine.generate(prompt_ids, max_new_tokens, sampling, reuse=reuse)
    try:
        for ev in events:
            answer.token_ids.append(ev.token)  # the end-of-sequence token too: generated, and counted (as run's)
            if ev.eos:
                answer.finish_reason = "stop"
                break
            piece, thought = split.push(ev.token)
            answer.reasoning += thought
            if thought and on_reasoning:
                on_reasoning(thought)
            piece = stop.push(piece)
            answer.text += piece
            if piece and on_text:
                on_text(piece)
            if stop.stopped:
                answer.finish_reason = "stop"
                break
            if cancelled is not None and cancelled():
                break
    finally:
        events.close()
    rest, thought = split.flush()
    answer.reasoning += thought
    if thought and on_reasoning:
        on_reasoning(thought)
    tail = stop.push(rest) + stop.flush()
    if stop.stopped:  # the stop string completed in the decoder's last bytes
        answer.finish_reason = "stop"
    answer.text += tail
    if tail and on_text:
        on_text(tail)
    return answer


class Conversation:
    def __init__(self, tokenizer, context: int, system: str | None = None, limit: int | None = None):
        """``limit``: the model's own context (None: no more than ``context``)."""
        self.tokenizer, self.context, self.system = tokenizer, context, system
        self.turns: list[dict] = []
        self.can_grow = bool(limit and limit > context)  # --context may be raised

    def remedy(self, shorten: str | None, fewer_tokens: bool = True) -> str:
        """What makes a prompt fit: ``shorten`` what (where it can be), fewer new tokens
        (where the prompt alone leaves room for one), and a larger --context where the
        model's allows one."""
        steps = [s for s in (shorten, "lower --max-new-tokens" if fewer_tokens else None) if s]
        if self.can_grow:
            return " or ".join([", ".join(steps), "raise --context"] if steps else ["raise --context"])
        if not steps:
            return "the model's context allows no more: use a model with a longer one"
        return f"{', '.join(steps)} (the model's context allows no more)"

    def encode(self, messages: list[dict]) -> list[int]:
        """The prompt ids of ``messages``; a template that renders them as nothing is a
        ``TemplateError`` (a conversation without a template is never empty: each turn
        ends in a newline)."""
        ids = self.tokenizer.encode_messages(messages)
        if not ids:
            from moespeq_cli.chat_template import TemplateError

            where = f"the chat template in {self.tokenizer.template_source}"
            raise TemplateError(f"{where} renders a conversation as an empty prompt")
        return ids

    def reset(self) -> None:
        self.turns = []

    def head(self) -> list[dict]:
        """The system message, where there is one."""
        return [{"role": "system", "content": self.system}] if self.system else []

    def messages(self) -> list[dict]:
        return self.head() + self.turns

    def check_room(self, max_new_tokens: int) -> None:
        """Refuse, at start, a system message or a ``max_new_tokens`` that leaves no room
        for a short message (the chat format's own tokens counted) and an answer
        (UsageError): every message would fail."""
        n = len(self.encode([*self.head(), {"role": "user", "content": "hi"}]))
        if n + max_new_tokens > self.context:
            what = (
                f"--system (about {n} tokens with a short message)"
                if self.system
                else (f"a short message ({n} tokens in the chat format)")
            )
            raise UsageError(
                f"{what} and an answer of --max-new-tokens {max_new_tokens} do not fit the context of "
                f"{self.context}; {self.remedy('shorten --system' if self.system else None, n < self.context)}"
            )

    def prompt(self, max_new_tokens: int) -> tuple[list[int], int]:
        """-> (prompt ids, how many old turns were dropped to fit ``context``). A newest
        message that cannot fit even alone is taken back (UsageError) and the history
        stays as it was."""
        turns, dropped = list(self.turns), 0
        head = self.head()
        while True:
            ids = self.encode(head + turns)
            if len(ids) + max_new_tokens <= self.context:
                self.turns = turns
                return ids, dropped
            if len(turns) <= 1:
                self.turns = self.turns[:-1]
                raise UsageError(
                    f"the message ({len(ids)} tokens) and an answer of --max-new-tokens {max_new_tokens} do not "
                    f"fit the context of {self.context}; {self.remedy('shorten it')}"
                )
            # the oldest exchange goes: a user turn and the answer after it
            cut = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
            turns = turns[cut:]
            dropped += cut
