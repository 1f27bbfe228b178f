"""``moespeq chat``: an interactive conversation with a model, streamed; or, with standard
input not a terminal, one user message per input line (scripts pipe a conversation)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import TYPE_CHECKING

from moespeq_cli.chat_template import TemplateError
from moespeq_cli.cli import options as o
from moespeq_cli.cli.render import LoadingStatus
from moespeq_cli.cli.signals import interrupt_handled
from moespeq_cli.errors import CheckpointError, MoespeqError, Terminated, UsageError

if TYPE_CHECKING:  # the engine imports torch: not at the command's import
    from moespeq_cli.runtime.engine import Engine

EPILOG = """[bold]Examples[/bold]

  [dim]# the built-in demo model[/dim]
  moespeq chat

  moespeq chat qwen3-moe --vram 12GB --temperature 0.7

  moespeq chat ./ckpt --system "Answer in one sentence." --stop "User:"

  [dim]# one message per line[/dim]
  printf 'Hello\\nAnd then?\\n' | moespeq chat ./ckpt -n 64

  [dim]# one JSON object per answer[/dim]
  printf 'Hello\\nAnd then?\\n' | moespeq chat --json | jq -r .content

  [bold]In the conversation[/bold]: /reset forgets the history, /stats shows the last answer's statistics, \
/help lists these, /exit (or Ctrl-D) leaves; at a terminal the arrow keys edit the line and recall earlier ones; \
Ctrl-C stops the current answer (reading a pipe or a file, it then ends the chat: exit 130). From a pipe or a \
file, a line that gets no answer (too long for the context, not UTF-8 text, an unknown /command) is said and \
skipped, and the chat then ends with exit code 1.
"""

DEFAULT_CONTEXT = 4096  # tokens a conversation may hold unless --context says otherwise (capped by the model)
DEMO_CONTEXT = 512  # the demo's: what its default 24 MiB budget holds beside the model
ANSWER_TOKENS = 512  # an answer's most tokens unless -n says otherwise (at most half the context)
COMMANDS = "/reset, /stats, /help, /exit"
HELP = (
    "/reset forgets the conversation, /stats shows the last answer's statistics, /help shows this, /exit (or "
    "Ctrl-D) leaves; start a message with // to send one that begins with /; Ctrl-C stops an answer"
)


CHAT_TEMPLATE_REMEDY = (
    "fix the template (chat renders every message with it), or use `moespeq run --no-chat` for plain continuation"
)


def load_session(
    model: str | None,
    context: int | None,
    max_new_tokens: int,
    status: LoadingStatus | None = None,
    check=None,
    **options,
) -> tuple[str, Engine, int]:
    """Resolve the model, build and load the engine for a conversation's context: shared
    by chat and serve (``status``: the caller's loading line, else one of its own, ended
    here; ``max_new_tokens``: what an answer must have room for; ``check(engine, ctx)``:
    run once the tokenizer is read and the context known, before any weight is). ->
    (display name, engine, context)."""
    if status is None:
        with LoadingStatus() as own:
            return load_session(model, context, max_new_tokens, own, check, **options)
    from moespeq_cli.cli.run import build_engine, plan_and_load
    from moespeq_cli.model_ref import DEMO, resolve

    name, path = resolve(model)
    engine = build_engine(name, path, status, context=context, **options)
    limit = engine.ckpt.config.context_limit
    default = DEMO_CONTEXT if name == DEMO else DEFAULT_CONTEXT
    ctx = engine.context_for(0, max_new_tokens) if context is not None else min(limit, default)
    if max_new_tokens >= ctx:
        raise UsageError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a message in a context of {ctx} tokens; lower it"
        )
    if check is not None:
        check(engine, ctx)
    plan_and_load(engine, name, ctx, status)
    return name, engine, ctx


def note(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def chat(
    model: o.ModelArg = None,
    max_new_tokens: o.AnswerTokens = None,
    temperature: o.Temperature = 0.0,
    top_p: o.TopP = 1.0,
    top_k: o.TopK = 0,
    seed: o.Seed = None,
    stop: o.Stop = None,
    system: o.System = None,
    backend: o.Backend = "auto",
    hardware: o.Hardware = None,
    vram: o.Vram = None,
    ram: o.Ram = None,
    policy: o.Policy = "moespeq",
    cpu_experts: o.CpuExperts = None,
    draft: o.Draft = "auto",
    spec_depth: o.SpecDepth = "auto",
    cpu_threads: o.CpuThreads = None,
    dtype: o.Dtype = None,
    context: o.ConversationContext = None,
    json_out: o.ChatJson = False,
) -> None:
    """Chat with a MoE model.

    Uses the model's chat template (a model without one continues the text as written).
    The history is kept within the context; the oldest turns are dropped, with a
    notice, when it outgrows it. Sampling options are run's. With --json each answer is
    one JSON object on its own line ({"turn", "content", "token_ids", "interrupted",
    "reasoning", "finish_reason", "stats"}; reasoning: a thinking model's, apart from
    the content, or null), so a script can tell answers apart whatever their text
    holds: finish_reason is "stop" (end of sequence or a --stop string), "length"
    (--max-new-tokens) or "interrupted" (Ctrl-C; then interrupted is true); token_ids are
    every token generated, the end-of-sequence token and the one that completed a stop
    string included (stats' new_tokens counts them alike). A line that
    gets no answer (longer than the context, not UTF-8, an unknown /command) is
    {"error", "line"} instead, its line number in the input. Start a message with // to
    send it beginning with /.
    """
    from moespeq_cli.cli.render import Renderer
    from moespeq_cli.cli.run import result_dict, sampling_params, stop_strings, utf8_text

    options = o.engine_options(locals())
    system = utf8_text(system, "--system") if system is not None else None
    stop = stop_strings(stop)
    with LoadingStatus(quiet=json_out) as status:  # first: what follows imports torch (a second)
        from moespeq_cli.conversation import Answer, Conversation, complete

        sampling = sampling_params(temperature, top_p, top_k, seed)

        def answer_tokens(ctx: int) -> int:  # the demo's context is 512: an answer of 512 would leave no room to ask
            return max_new_tokens if max_new_tokens is not None else min(ANSWER_TOKENS, ctx // 2)

        def conversation(engine, ctx: int) -> Conversation:
            """The conversation, its template checked on it: said once, at start, before
            the weights load (not after minutes, nor as every message's failure)."""
            convo = Conversation(engine.tokenizer, ctx, system, engine.ckpt.config.context_limit)
            try:
                convo.check_room(answer_tokens(ctx))
            except TemplateError as e:
                if e.refused:  # on purpose: a conversation of this form ("System role not supported")
                    drop = "; leave out --system" if system else ""
                    raise UsageError(
                        f"the model's chat template refuses a conversation like this ({e.detail}){drop}"
                    ) from None
                raise CheckpointError(f"{e.what}; {CHAT_TEMPLATE_REMEDY}") from None
            return convo

        name, engine, ctx = load_session(
            model, context, max_new_tokens or 1, status=status, check=conversation, **options
        )
    interactive = sys.stdin is not None and sys.stdin.isatty()
    max_new_tokens = answer_tokens(ctx)
    out = Renderer(json_mode=json_out)
    if not json_out:
        out.plan(engine)
    convo = conversation(engine, ctx)
    template = "its chat template" if engine.tokenizer.chat_template else "no chat template: plain continuation"
    if interactive:
        note(f"chatting with {name} ({template}, context {ctx} tokens); {COMMANDS}; Ctrl-C stops an answer")
    last: tuple[list[int], list[int], float] | None = None
    turn = lineno = 0
    skipped: list[int] = []  # the lines that got no answer (a script's conversation then exits 1)

    def unanswered(message: str) -> None:
        """A line that gets no answer: said on stderr, and with --json in the output."""
        skipped.append(lineno)
        note(f"moespeq: {message}")
        if json_out:
            sys.stdout.write(json.dumps({"error": message, "line": lineno}) + "\n")
            sys.stdout.flush()

    # the prompt on the terminal: stdout unless it holds JSON or is redirected (a file of
    # the answers holds the answers alone); the line editor where stdout is the terminal
    editing = interactive and not json_out and sys.stdout.isatty()
    while True:
        try:
            line = read_message(interactive, sys.stdout if editing else sys.stderr, editing)
        except UsageError as e:
            lineno += 1
            unanswered(str(e))
            continue
        if line is None:
            break
        lineno += 1
        text = line.strip()
        if not text:
            continue
        if text.startswith("//"):  # a message that begins with /
            line = line.replace("/", "", 1)
        elif text.startswith("/"):
            cmd = text.split()[0]
            if cmd in ("/exit", "/quit", "/bye"):
                break
            if cmd == "/reset":
                convo.reset()
                note("(history cleared)")
            elif cmd == "/help":
                note(HELP)
            elif cmd == "/stats":
                if last is None:
                    note("(no answer yet)")
                else:
                    out.stats_line(result_dict(name, engine, *last))  # (prompt ids, token ids, wall seconds)
            else:
                unanswered(f"unknown command {cmd}; the commands are {COMMANDS} (start a message with // to send /)")
            continue
        convo.turns.append({"role": "user", "content": line.rstrip("\n")})
        try:
            prompt_ids, dropped = convo.prompt(max_new_tokens)
        except UsageError as e:
            unanswered(str(e))
            continue
        except TemplateError as e:  # on this conversation: the template's own refusal, or its failure
            convo.turns.pop()
            if e.refused:  # on purpose ("System role not supported"): the messages are the matter
                unanswered(f"the model's chat template refused the conversation ({e.detail}); the message is skipped")
            else:
                unanswered(f"{e.what}, so the message is skipped: {CHAT_TEMPLATE_REMEDY}")
            continue
        if dropped:
            note(f"(the {dropped} oldest messages were dropped to fit the context of {ctx} tokens)")
        answer, stopped, leave = Answer(), False, False
        if turn and not (interactive or json_out):  # from a pipe: a blank line between answers, which hold lines too
            out.text("\n")
        engine.last_stats = None  # a Ctrl-C before the first token leaves no stats, not the last answer's
        started = time.perf_counter()
        try:
            complete(
                engine,
                prompt_ids,
                max_new_tokens,
                sampling,
                stop,
                out.text,
                answer=answer,
                reuse=True,
                on_reasoning=out.reasoning,
                channels=bool(engine.tokenizer.chat_template),
            )
        except Terminated:  # kill or a closed terminal: the error on a line of its own
            if not json_out:
                with contextlib.suppress(OSError, MoespeqError):  # (a terminal gone: the signal's exit code)
                    out.end_text()
            raise
        except KeyboardInterrupt:
            note("\n(stopped)")
            stopped = True
            if interactive:
                interrupt_handled()  # the chat goes on: the next Ctrl-C stops the next answer
            else:  # a conversation from a pipe or a file: Ctrl-C ends it, after this answer's record
                leave = True
        turn += 1
        if json_out:
            finish = "interrupted" if stopped else answer.finish_reason
            record = {"turn": turn, "content": answer.text, "token_ids": answer.token_ids, "interrupted": stopped}
            record["reasoning"] = answer.reasoning or None  # a think block's or gpt-oss's analysis, apart
            record["finish_reason"] = finish
            stats = engine.last_stats.to_dict() if engine.last_stats is not None else None
            sys.stdout.write(json.dumps(record | {"stats": stats}) + "\n")
            sys.stdout.flush()
        else:
            out.end_text()
        convo.turns.append({"role": "assistant", "content": answer.text})
        if engine.last_stats is not None:
            last = (prompt_ids, answer.token_ids, time.perf_counter() - started)
        if leave:
            engine.close()
            raise KeyboardInterrupt
    engine.close()
    if skipped and not interactive:  # at a terminal the user saw each; a script learns it by the exit code
        shown = ", ".join(map(str, skipped[:8])) + (", ..." if len(skipped) > 8 else "")
        raise MoespeqError(f"{len(skipped)} of the conversation's lines got no answer (line {shown}; each said above)")


def read_message(interactive: bool, prompt_to=sys.stdout, editing: bool = False) -> str | None:
    """The next user message (None at the end of input). At a terminal, Ctrl-C on an
    empty prompt says how to leave instead of leaving; the prompt goes to ``prompt_to``
    (stderr with --json, whose stdout holds JSON alone, or with stdout redirected).
    ``editing``: through GNU readline (Python's ``input`` takes it once imported): the
    arrow keys, Ctrl-A/E, the session's earlier lines, and no 4095-character limit of the
    terminal's own line discipline."""
    if not interactive:
        stream = getattr(sys.stdin, "buffer", sys.stdin)
        raw = stream.readline()
        if not raw:  # the end of input
            return None
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError("the line is not valid UTF-8 text; skipped") from None
        # a CRLF file's line is the same message as an LF file's, and a byte-order mark
        # (Notepad's first bytes) is not text
        return raw.removesuffix("\n").removesuffix("\r").removeprefix("\ufeff")
    if editing:
        try:
            import readline  # noqa: F401  (input() edits through it once imported)
        except ImportError:  # a Python built without it: the terminal's own line editing
            editing = False
    while True:
        try:
            try:
                if editing:
                    line = input(">>> ")
                else:
                    prompt_to.write(">>> ")
                    prompt_to.flush()
                    line = input()
                line.encode("utf-8")  # bytes that are not UTF-8: lone surrogates (surrogateescape) ...
            except (UnicodeDecodeError, UnicodeEncodeError):  # ... or an error (a strict locale)
                raise UsageError("the line is not valid UTF-8 text; skipped") from None
            return line
        except EOFError:
            prompt_to.write("\n")
            return None
        except KeyboardInterrupt:
            interrupt_handled()
            note("\n(Ctrl-D or /exit to leave)")
