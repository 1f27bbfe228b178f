"""``moespeq run``: generate text, streamed to stdout, statistics to stderr (or one JSON
object on stdout with ``--json``)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from moespeq_cli.cli import options as o
from moespeq_cli.cli.render import LoadingStatus, end_note
from moespeq_cli.errors import CheckpointError, MoespeqError, Terminated, UsageError
from moespeq_cli.fs import check_output, read_text

if TYPE_CHECKING:  # the engine imports torch: not at the command's import
    from moespeq_cli.runtime.engine import Engine
    from moespeq_cli.runtime.planning.planner import Plan

EPILOG = """[bold]Examples[/bold]

  [dim]# the built-in demo model[/dim]
  moespeq run

  moespeq run ./my-checkpoint -p "Once upon a time" -n 64

  moespeq run mixtral --temperature 0.7 --top-p 0.9 --seed 1

  moespeq run ./ckpt --backend cpu --json | jq .stats.tokens_per_s

  [dim]# end the text before a string (the string left out)[/dim]
  moespeq run -p $'Q: What is 2+2?\\nA:' --stop "Q:" -n 64

  [dim]# experts beyond 4 GB stream from disk[/dim]
  moespeq run ./ckpt --backend cpu --ram 4GB
"""

DEMO_PROMPT = "First Citizen:\nGood morrow, masters; what news from the court?\n\nSecond Citizen:\n"
DEFAULT_PROMPT = "Write a short poem about the sea."


DEFAULT_MAX_NEW_TOKENS = 128
PROMPT_LIMIT = 16 * 2**20  # bytes: far beyond any model's context, small enough to hold
STDIN_WAIT_S = 2.0  # a pipe with nothing in it this long is not a prompt (use --prompt-file -)


def read_prompt(prompt: str | None, prompt_file: Path | None, default: str) -> str:
    """--prompt, --prompt-file (``-`` is standard input), text piped on standard input,
    or ``default``; bounded in size, never blocking on a FIFO or a device."""
    if prompt is not None and prompt_file is not None:
        raise UsageError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        if str(prompt_file) == "-":
            prompt = read_stdin(wait=None)
        else:
            from moespeq_cli.fs import file_status

            if file_status(prompt_file)[0] == "a FIFO":  # `--prompt-file <(...)`: read to its end
                prompt = read_pipe(prompt_file)
            else:
                # a byte-order mark (Notepad's) is not prompt text, as on standard input
                prompt = read_text(prompt_file, PROMPT_LIMIT, "--prompt-file", UsageError).removeprefix("\ufeff")
    elif prompt is None and stdin_is_piped():
        piped = read_stdin(wait=STDIN_WAIT_S)
        if piped is None:  # an open pipe that stayed silent: say so, rather than quietly use the default
            print(
                f"moespeq: nothing came on standard input within {STDIN_WAIT_S:g} s: using the default prompt "
                "(--prompt-file - waits for a slow pipe)",
                file=sys.stderr,
            )
        elif piped and not piped.strip():  # something was sent, and it is blank: not a prompt, nor the default
            raise UsageError("the prompt from standard input is blank; pipe some text, or pass --prompt")
        elif piped == "" and (mode := stdin_mode()) is not None:  # a real descriptor, not a test runner's buffer
            if stat.S_ISREG(mode):  # `moespeq run < empty.txt`: a prompt file, empty
                raise UsageError("standard input is an empty file; give it some text, or pass --prompt")
            print("moespeq: standard input was empty: using the default prompt", file=sys.stderr)  # `cat empty |`
        prompt = piped or None
    if prompt is None:
        return default
    if len(prompt) > PROMPT_LIMIT:
        raise UsageError(f"the prompt is longer than {PROMPT_LIMIT // 2**20} MiB; shorten it")
    prompt = utf8_text(prompt, "the prompt")
    if not prompt.strip():
        raise UsageError("the prompt is empty; pass some text with --prompt or --prompt-file")
    return prompt


def utf8_text(value: str, what: str) -> str:
    """Command-line text as the UTF-8 it was typed in: Python decodes arguments with the
    locale's codec, so under an ASCII locale ("C", UTF-8 mode off) "Héllo" arrives as
    escaped bytes; bytes that are not UTF-8 at all are a usage error naming ``what``."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:  # undecodable bytes arrive as surrogates
        pass
    try:
        return os.fsencode(value).decode("utf-8")
    except (UnicodeError, ValueError):
        raise UsageError(f"{what} is not valid UTF-8 text; pass it as UTF-8") from None


def stop_strings(stop: list[str] | None) -> list[str]:
    """``--stop`` as given (repeatable), each UTF-8 and not empty (it would stop nothing)."""
    stops = [utf8_text(s, "--stop") for s in stop or []]
    if "" in stops:
        raise UsageError("--stop is empty; give the text the output stops before")
    return stops


def stdin_mode() -> int | None:
    """Standard input's file mode, None where it has no descriptor (a test runner's buffer)."""
    try:
        return os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return None


def stdin_is_piped() -> bool:
    """Standard input is a pipe or a redirected file (not a terminal, /dev/null or closed)."""
    if sys.stdin is None:
        return False
    mode = stdin_mode()
    if mode is None:
        return not sys.stdin.isatty()
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def read_stdin(wait: float | None) -> str | None:
    """Standard input to its end, at most PROMPT_LIMIT bytes. With ``wait``, a pipe that
    neither sends a byte nor closes within that many seconds gives None."""
    import select

    stream = getattr(sys.stdin, "buffer", sys.stdin)
    if wait is not None:
        try:
            ready, _, _ = select.select([sys.stdin], [], [], wait)
            if not ready:
                return None
        except (OSError, ValueError, TypeError):  # no descriptor to select on: read the buffer
            pass
    data = stream.read(PROMPT_LIMIT + 1)
    return prompt_of(data.encode() if isinstance(data, str) else data, "standard input")


def read_pipe(path: Path) -> str:
    """A FIFO's text to its end (``--prompt-file <(...)``). Opened without waiting for a
    writer, and read once one has sent something: a FIFO nobody writes to is an error
    after ``STDIN_WAIT_S``, never a hang."""
    import select

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        # a writer that opens after us: wait for its first bytes (Linux reports no hang-up
        # before a writer has come), as long as a silent pipe on standard input is waited for
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(STDIN_WAIT_S * 1000):
            raise UsageError(
                f"--prompt-file {path}: nothing came within {STDIN_WAIT_S:g} s; is anything writing to it?"
            )
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while size <= PROMPT_LIMIT and (chunk := os.read(fd, 1 << 20)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return prompt_of(b"".join(chunks), f"--prompt-file {path}")


def prompt_of(data: bytes, where: str) -> str:
    """``data`` read from ``where`` as a prompt's text: at most PROMPT_LIMIT bytes, UTF-8."""
    if len(data) > PROMPT_LIMIT:
        raise UsageError(f"{where} holds more than {PROMPT_LIMIT // 2**20} MiB; a prompt must be shorter")
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Notepad's) is not prompt text
    except UnicodeDecodeError:
        raise UsageError(f"{where} is not UTF-8 text; pass the prompt as text") from None


def run(
    model: o.ModelArg = None,
    prompt: o.Prompt = None,
    prompt_file: o.PromptFile = None,
    max_new_tokens: o.MaxNewTokens = DEFAULT_MAX_NEW_TOKENS,
    temperature: o.Temperature = 0.0,
    top_p: o.TopP = 1.0,
    top_k: o.TopK = 0,
    seed: o.Seed = None,
    stop: o.Stop = None,
    backend: o.Backend = "auto",
    hardware: o.Hardware = None,
    vram: o.Vram = None,
    ram: o.Ram = None,
    policy: o.Policy = "moespeq",
    cpu_experts: o.CpuExperts = None,
    draft: o.Draft = "auto",
    spec_depth: o.SpecDepth = "auto",
    trace: o.Trace = None,
    cpu_threads: o.CpuThreads = None,
    dtype: o.Dtype = None,
    chat: o.Chat = None,
    context: o.Context = None,
    json_out: o.Json = False,
) -> None:
    """Generate text with a MoE model.

    Streams the completion to stdout and prints a statistics line to stderr. With
    --temperature 0 (the default) decoding is greedy and deterministic. --stop ends the
    text before a string (repeatable; the string is left out, and with --json `text` ends
    before it too while `token_ids` keep the token that completed it; finish_reason
    "stop"); for a reasoning model it applies to the answer, not the reasoning.
    """
    from moespeq_cli.cli.render import Renderer

    options = o.engine_options(locals())
    out = Renderer(json_mode=json_out)
    stops = stop_strings(stop)
    with LoadingStatus(quiet=json_out) as status:  # first: what follows imports torch (a second)
        from moespeq_cli.conversation import StopMatcher
        from moespeq_cli.harmony import Split

        check_outputs({"--trace": trace}, model, prompt_file, hardware, draft)
        sampling = sampling_params(temperature, top_p, top_k, seed)
        name, engine, text, prompt_ids = prepare(
            model,
            prompt,
            prompt_file,
            max_new_tokens,
            chat,
            context=context,
            offload_for="--trace" if trace is not None else None,
            status=status,
            **options,
        )
        # gpt-oss, think blocks: reasoning to stderr, answer to stdout
        split = Split(engine.tokenizer, uses_template(engine, chat), prompt_ids)
        matcher = StopMatcher(stops)  # on the answer (a reasoning model's final channel), as chat's
        token_ids: list[int] = []
        thought: list[str] = []  # the reasoning, for --json (its text has the markers decoded away)

        def shown(pieces: tuple[str, str]) -> None:
            answer, reasoning = pieces
            thought.append(reasoning)
            out.split(matcher.push(answer), reasoning)

        def finished() -> dict:
            shown(split.flush())
            out.text(matcher.flush())  # held back as a stop string's possible start, and none came
            result = result_dict(name, engine, prompt_ids, token_ids, time.perf_counter() - started)
            result["reasoning"] = "".join(thought) if split.router is not None else None
            if matcher.stopped:  # the raw text up to where the stop string begins (it ends the stream)
                raw = result["text"]
                cut = raw.rfind(matcher.dropped)  # (the whole decode may end past it: a partial character)
                if cut >= 0:
                    result["text"] = raw[:cut]
                result["finish_reason"] = "stop"
            return result

        def deliver(result: dict) -> None:
            """The result (what ran so far where interrupted), and --trace's file."""
            if json_out:  # the file first: the result then says whether it was written (a script reads stdout alone)
                if trace is not None:
                    result["trace"] = str(trace)
                writers = [("trace", lambda: write_trace(engine, trace, result))] if trace is not None else []
                json_with_files(result, writers)
                return
            out.end_text()
            out.stats_line(result)
            n = len(token_ids)
            if result["finish_reason"] == "stop" and n < max_new_tokens and not matcher.stopped:
                out.note(f"the model ended its text (end-of-sequence token) after {n} of -n {max_new_tokens}")
            if (note := end_note(engine, result)) and not result["interrupted"]:
                out.note(note)
            if trace is not None:  # after the output: a trace that cannot be written loses no answer
                write_trace(engine, trace, result)

        started = time.perf_counter()
        try:
            events = engine.generate(prompt_ids, max_new_tokens, sampling)
            for ev in events:
                if not token_ids and not json_out:
                    # Shown once the first token exists, so that a failure of the first pass
                    # (NaN weights, say) is the only line on stderr.
                    status.stop()
                    out.plan(engine)
                    if text == DEMO_PROMPT and sys.stdout.isatty():
                        # the default demo prompt: show what the model continues (on a terminal: a
                        # file of the output holds the model's text alone, as with any other prompt)
                        out.text(text)
                token_ids.append(ev.token)
                shown(split.push(ev.token))
                if matcher.stopped:
                    events.close()  # (the generation's statistics are taken as it ends)
                    break
        except (KeyboardInterrupt, Terminated):
            # Ctrl-C (or kill, timeout): what was generated, its statistics, then
            # `interrupted` (exit 130; 143 for SIGTERM); with --json the object even before
            # the first token (a script reads stdout alone)
            if token_ids or json_out:
                result = finished()
                result["interrupted"], result["finish_reason"] = True, "interrupted"
                # (after SIGHUP the terminal may be gone: the signal's exit code, not the write's error)
                with contextlib.suppress(OSError, MoespeqError):
                    deliver(result)  # --trace: what ran so far, as profile writes it
            raise
    deliver(finished())


def check_outputs(
    outputs: dict[str, Path | None], model: str | None, prompt_file: Path | None, hardware: str | None, draft: str
) -> None:
    """Refuse, before any work, outputs that cannot be written, that hold something other
    than an earlier output of their kind (a user's file), or that would replace one of
    the run's inputs (the checkpoint's files, the prompt file, the hardware profile, the
    draft)."""
    from moespeq_cli.fs import check_not_input, check_replaces_own
    from moespeq_cli.model_ref import resolve
    from moespeq_cli.profiling.report import REPORT
    from moespeq_cli.quant.draft_store import drafts_of
    from moespeq_cli.runtime.timeline import TRACE

    own = {"--trace": TRACE, "--report": REPORT}
    for option, path in outputs.items():
        check_output(path, option)
    if all(path is None for path in outputs.values()):
        return
    ckpt = resolve(model)[1]
    inputs: list[tuple[str, Path | None]] = [("the checkpoint", ckpt), ("--prompt-file", prompt_file)]
    if ckpt is not None:  # its drafts, whichever the run loads (or none): never replaced by an output
        inputs += [("the checkpoint's draft", d) for d in drafts_of(ckpt)]
    for option, given in (("--hardware", hardware), ("--draft", draft)):
        if given not in (None, "auto", "none") and os.path.lexists(given):
            inputs.append((option, Path(given)))
    for option, path in outputs.items():
        check_not_input(path, option, inputs)  # (said first: "would overwrite the checkpoint's ...")
        check_replaces_own(path, option, own[option])


def sampling_params(temperature: float, top_p: float, top_k: int, seed: int | None):
    from moespeq_cli.runtime.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)


def prepare(
    model,
    prompt,
    prompt_file,
    max_new_tokens,
    chat=None,
    offload_for: str | None = None,
    status: LoadingStatus | None = None,
    **options,
):
    """Resolve the model, read the prompt, build the engine (``options``: EngineOptions
    fields), check the prompt fits the model's context and plan memory (before any weight
    is read), and load: shared by run and profile (``offload_for``: ``plan_and_load``'s;
    ``status``: the caller's loading line, told each step; the caller stops it)."""
    from moespeq_cli.model_ref import resolve

    status = status or LoadingStatus(quiet=True)
    name, path = resolve(model)
    typed = prompt_file is not None and str(prompt_file) == "-" and sys.stdin.isatty()
    with status.paused() if typed else contextlib.nullcontext():  # the line would draw over the typing
        text = prompt_text(name, prompt, prompt_file)
    engine = build_engine(name, path, status, **options)
    prompt_ids = encode_prompt(engine, text, chat, max_new_tokens)
    context = engine.context_for(len(prompt_ids), max_new_tokens)
    plan_and_load(engine, name, context, status, offload_for)
    status.show(f"{name}: reading the prompt ({len(prompt_ids)} tokens)")
    return name, engine, text, prompt_ids


def build_engine(name: str, path: Path, status: LoadingStatus, **options) -> Engine:
    """The engine for model ``name`` at ``path`` (``options``: EngineOptions fields; the
    device budget defaults as ``name`` wants it), built (config, tokenizer, weights mapped,
    nothing read) with ``status`` saying so."""
    from moespeq_cli.model_ref import default_vram
    from moespeq_cli.runtime.engine import Engine, EngineOptions
    from moespeq_cli.runtime.planning.hardware import load_profile

    status.show(f"loading {name}")
    if isinstance(options.get("hardware"), str):  # read once: the budget and the engine see the same profile
        options["hardware"] = load_profile(options["hardware"])
    options["vram"] = default_vram(name, options.get("vram"), options.get("hardware"), options.get("backend"))
    return Engine(path, EngineOptions(**options))


def plan_and_load(
    engine: Engine, name: str, context: int, status: LoadingStatus, offload_for: str | None = None
) -> Plan | None:
    """Plan memory for ``context`` tokens, then load: shared by every command that runs a
    model. ``offload_for``: what needs an offloading run (``--trace``, ``profile``),
    refused before loading when the run would be the plain cpu reference."""
    plan = engine.make_plan(context)
    if plan is None and offload_for:
        raise UsageError(
            f"{offload_for} needs an offloading run: the mock or cuda backend, or --backend cpu with --ram below the "
            "experts' size (the plain cpu backend keeps no timeline)"
        )
    if plan is None and (ignored := engine.ignored_options()):
        status.note(f"note: {ignored}")
    status.planned(name, plan)
    engine.load(context, plan)
    return plan


def prompt_text(name: str, prompt: str | None, prompt_file: Path | None) -> str:
    """What a run of model ``name`` decodes from: ``read_prompt`` with its default prompt."""
    from moespeq_cli.model_ref import DEMO

    default = DEMO_PROMPT if name == DEMO else DEFAULT_PROMPT
    return read_prompt(prompt, prompt_file, default)


def uses_template(engine, chat: bool | None) -> bool:
    """Whether the prompt goes through the chat template: --chat / --no-chat, else when
    the model has one."""
    return bool(engine.tokenizer.chat_template) if chat is None else chat


def encode_prompt(engine, text: str, chat: bool | None, max_new_tokens: int = 0) -> list[int]:
    """The prompt's token ids; a prompt that cannot fit the context even at the longest
    token per byte is refused before it is rendered or tokenized."""
    limit = engine.ckpt.config.context_limit
    # The bound is at most the byte count, so only a prompt longer than the context (in
    # characters, at most its bytes) pays for the tokenizer's vocabulary scan.
    if len(text) > limit and (fewest := engine.tokenizer.min_tokens(text)) > limit:
        engine.context_for(fewest, max_new_tokens, at_least=True)
    templated = uses_template(engine, chat)
    prompt_ids = engine.tokenizer.encode(text, chat=templated)
    if not prompt_ids and templated:
        from moespeq_cli.chat_template import TemplateError

        raise TemplateError(f"the chat template in {engine.tokenizer.template_source} renders the prompt as nothing")
    if not prompt_ids:
        raise UsageError("the prompt encodes to no tokens; pass some text with --prompt")
    vocab = engine.ckpt.config.vocab_size
    if max(prompt_ids) >= vocab:
        raise CheckpointError(
            f"{engine.ckpt.path / 'tokenizer.json'} gives token id {max(prompt_ids)}, beyond the model's "
            f"vocab_size of {vocab}; the tokenizer belongs to another model"
        )
    return prompt_ids


NO_DRAFT = "no draft loaded: speculation is off (k = 0)"
ALL_IN_RAM = "every expert fits in RAM: --backend cpu decodes from memory, without offloading or a draft (k = 0)"


def result_dict(name: str, engine, prompt_ids: list[int], token_ids: list[int], wall: float | None = None) -> dict:
    """The docs/design.md §7 object of ``run --json``; ``wall``: the generation's wall-clock
    seconds (beside the mock's virtual ones)."""
    from moespeq_cli.tokenizer import stream_text

    result = {
        "model": name,
        "model_type": engine.ckpt.config.model_type,
        "backend": engine.backend_name,
        "hardware": engine.hw.name if engine.hw else None,
        "policy": engine.policy_name,
        "plan": engine.plan.to_dict() if engine.plan else None,
        "prompt_token_ids": prompt_ids,
        "token_ids": token_ids,
        "text": stream_text(engine.tokenizer, token_ids),  # as streamed (StreamDecoder)
        "stats": engine.last_stats.to_dict() if engine.last_stats is not None else None,  # (None: stopped at once)
    }
    if wall is not None:
        result["wall_seconds"] = round(wall, 4)
    # why the text ended: the model's end-of-sequence token, or -n (Ctrl-C: "interrupted", set by run)
    result["finish_reason"] = "stop" if token_ids and token_ids[-1] in engine.tokenizer.eos_ids else "length"
    result["interrupted"] = False
    result |= {"draft": None, "spec_depths": None, "governor_note": None}  # the same keys whatever the policy
    # what the plan line notes
    result |= {"budget_note": engine.budget_note, "ram_note": engine.ram_note, "draft_note": engine.draft_note}
    if engine.scheduler is not None:
        from moespeq_cli.runtime.scheduling.governor import explain

        result["draft"] = engine.draft_source
        result["spec_depths"] = list(engine.governor.history)
        if engine.fixed_k is None:  # why speculation is off, when it is
            # the plan left the draft out (why), or none was asked for (--draft none)
            off = None if engine.plan.has_draft else engine.plan.note or NO_DRAFT
            where = "in RAM" if engine.plan.compute_tier == "host" else "on the device"
            result["governor_note"] = explain(engine.governor, engine.draft_released, off, where)
        elif engine.fixed_k and not engine.plan.has_draft:  # a depth asked for, and no room for the draft
            result["governor_note"] = engine.plan.note or NO_DRAFT
    elif engine.plan is None and engine.backend_name == "cpu":  # every expert in RAM: said at load, kept in --json
        result["governor_note"] = engine.ignored_options() or ALL_IN_RAM
    return result


def json_with_files(result: dict, writers: list[tuple[str, Callable[[], None]]]) -> None:
    """``--json``'s end: each of ``writers`` ((result key, writer)) run before ``result`` is
    printed (a script reads stdout alone), the first that fails and those after it null in
    it with ``error`` saying why, and that failure raised once the result is out."""
    failed = None
    for i, (_key, write) in enumerate(writers):
        try:
            write()
        except MoespeqError as e:
            for later, _ in writers[i:]:
                result[later] = None
            result["error"], failed = str(e), e
            break
    sys.stdout.write(json.dumps(result) + "\n")
    if failed is not None:
        raise failed


def write_trace(engine, path: Path, result: dict) -> None:
    if engine.backend is None:
        raise UsageError("--trace needs the mock or cuda backend (the cpu backend keeps no timeline)")
    engine.backend.timeline.write_chrome_trace(
        path, {k: result[k] for k in ("model", "policy", "hardware")} | {"clock": (result["stats"] or {}).get("clock")}
    )
