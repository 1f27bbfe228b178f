"""An OpenAI-compatible HTTP API over one loaded engine (``moespeq serve``).

Starlette (ASGI) does the HTTP and uvicorn serves it; this module is the API: routes,
request validation, response objects, Server-Sent Events for streaming, and the queue.

- ``GET /health``, ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions``,
  ``POST /v1/completions``;
- one model, one generation at a time: a single worker thread owns the engine and takes
  requests in order from a bounded FIFO queue; a request that finds it full is answered
  503 with ``Retry-After``;
- streaming answers are ``text/event-stream``: ``data: {chunk}`` events, a last chunk
  with the ``finish_reason``, with ``stream_options.include_usage`` a chunk with
  ``choices: []`` and the usage, then ``data: [DONE]``;
- a client that disconnects cancels its generation (the worker checks after every
  token), so the next request starts at once;
- errors are OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``:
  400 for a bad request, 401 without the key when ``--api-key`` is set, 404 for an
  unknown model, 413 for a body over 16 MiB, 503 when the queue is full;
- each response carries the run's statistics in a ``moespeq`` field, and the server log
  (stderr) has one line per request;
- Ctrl-C cuts the answer in progress after its current token (a long prompt's prefill
  ends first) and answers the queued requests 503, then uvicorn closes the connections
  and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import uvicorn

from moespeq_cli.chat_template import RESERVED, TemplateError
from moespeq_cli.conversation import Answer, complete
from moespeq_cli.text import counted, printable

MAX_BODY = 16 * 2**20
REASONING = "reasoning"  # tags a streamed piece of reasoning
MAX_STOPS = 4
ROLES = ("system", "user", "assistant", "developer")


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = dict(headers or {})
        if status == 401:
            self.headers["WWW-Authenticate"] = "Bearer"  # (RFC 9110: a 401 names its scheme)
        if status == 503:
            self.headers["Retry-After"] = "1"

    def body(self) -> dict:
        kind = {
            401: "authentication_error",
            403: "permission_error",
            404: "invalid_request_error",
            500: "server_error",
            503: "server_error",
        }.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: object
    stops: list[str]
    on_text: object = None  # called from the worker thread with each text piece
    on_reasoning: object = None  # and with each piece of a harmony model's reasoning (gpt-oss)
    channels: bool = False  # a chat request through the template: a harmony model's channels apart
    cancelled: bool = False  # the client went away
    answer: Answer = field(default_factory=Answer)
    stats: dict | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    notify: object = None  # called from the worker thread once the job is done (or dropped)
    on_start: object = None  # called when the worker starts the job, or when it is dropped
    running: bool = False  # the worker started it

    def start(self) -> None:
        if self.on_start is not None:
            self.on_start()

    def finish(self) -> None:
        self.done.set()
        self.start()  # (a second call: a set event is set again)
        if self.notify is not None:
            self.notify()


def shutting_down(detail: str = "") -> ApiError:
    return ApiError(503, "the server is shutting down" + detail, "shutting_down")


class Worker:
    """The one thread that touches the engine; requests wait in a bounded FIFO. ``halt``
    (Ctrl-C: uvicorn waits for open connections before it shuts down, and an answer on a
    big model can take minutes) cuts the answer in progress after its current token and
    has every queued request answered 503; ``stop`` also joins the thread."""

    def __init__(self, engine, queue_size: int):
        self.engine = engine
        self.stopping = False
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.thread = threading.Thread(target=self._loop, name="moespeq-serve", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        if self.stopping:
            raise ApiError(503, "the server is shutting down", "shutting_down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, "the server is busy: its queue is full; retry shortly", "queue_full") from None

    def halt(self) -> None:
        """A flag and nothing else, so that a signal handler may call it (it runs between
        two bytecodes of the main thread, perhaps inside ``submit``'s hold of the queue's
        lock): the worker cuts the answer in progress and answers what waits as it takes it."""
        self.stopping = True

    def stop(self, timeout: float = 10.0) -> None:
        self.halt()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.error = shutting_down()
                job.finish()
        with contextlib.suppress(queue.Full):  # a submit that raced the flag: the worker answers it
            self.jobs.put(None, timeout=timeout)
        self.thread.join(timeout)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.stopping and not job.cancelled:
                job.error = shutting_down()
            elif not job.cancelled:
                job.running = True
                job.start()
                try:
                    complete(
                        self.engine,
                        job.prompt_ids,
                        job.max_tokens,
                        job.sampling,
                        job.stops,
                        job.on_text,
                        cancelled=lambda job=job: job.cancelled or self.stopping,
                        answer=job.answer,
                        reuse=True,  # a conversation's earlier turns are not prefilled again
                        on_reasoning=job.on_reasoning,
                        channels=job.channels,
                    )
                    job.stats = stats_of(self.engine)
                    a = job.answer
                    if (
                        self.stopping
                        and not job.cancelled
                        and a.finish_reason == "length"
                        and len(a.token_ids) < job.max_tokens
                    ):
                        job.error = shutting_down(": the answer was cut short")
                except BaseException as e:  # noqa: BLE001 - reported to the request, the worker goes on
                    job.error = e
            job.finish()


class HaltingServer(uvicorn.Server):
    """uvicorn's server, whose Ctrl-C (or SIGTERM) also halts the app's worker: uvicorn
    waits for open connections to close before it shuts down, and on a big model an
    answer takes minutes."""

    def __init__(self, config, on_listening=None):
        super().__init__(config)
        self.on_listening = on_listening  # called once requests are taken (a start-up line said before refused them)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not self.should_exit and self.on_listening is not None:
            self.on_listening()

    def handle_exit(self, sig, frame) -> None:
        state = self.config.app.state
        state.worker.halt()
        loop = getattr(state, "loop", None)  # (none before the app's start-up: no request yet)
        if loop is not None:  # a signal handler interrupts the loop's own code: woken, not called into
            loop.call_soon_threadsafe(state.halted.set)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:  # a second Ctrl-C: uvicorn skips the app's shutdown, whose task was
            await self.lifespan.shutdown()  # then cancelled with a traceback; ours is quick (halted)


def stats_of(engine) -> dict:
    s = engine.last_stats
    if s is None:
        return {}
    keep = ("tokens_per_s", "seconds", "clock", "acceptance_rate", "expert_hit_rate", "io_stall_s", "ttft_s")
    return {k: getattr(s, k, None) for k in keep} | {"prompt_tokens_reused": engine.reused_tokens}


# What an OpenAI request may ask that moespeq does not do: refused (400) when it would
# change the answer, rather than answered as if it had not been asked.
UNSUPPORTED = {
    "logprobs": "log probabilities",
    "top_logprobs": "log probabilities",
    "echo": "echoing the prompt",
    "tools": "tool calls",
    "functions": "function calls",
    "logit_bias": "biasing token logits",
    "presence_penalty": "penalties",
    "frequency_penalty": "penalties",
    "suffix": "text after the insertion point",
    "audio": "audio output",
    "prediction": "predicted outputs",
}
# ... and those whose neutral value asks nothing (a client may always send it): OpenAI's,
# then the extensions of vLLM and llama.cpp's server that change the answer (clients such
# as chat front ends send them at their defaults; another value would be silently lost)
UNSUPPORTED_BUT = {
    "tool_choice": ("none", "tool calls"),
    "function_call": ("none", "function calls"),
    "modalities": (["text"], "output other than text"),  # (and [], which asks for nothing)
    "repetition_penalty": (1, "penalties"),
    "repeat_penalty": (1, "penalties"),
    "length_penalty": (1, "beam search"),
    "dry_multiplier": (0, "DRY sampling"),
    "xtc_probability": (0, "XTC sampling"),
    "tfs_z": (1, "tail-free sampling"),
    "top_n_sigma": (-1, "top-n-sigma sampling"),
    "n_probs": (0, "log probabilities"),
    "bad_words": ([], "banned words"),
    "allowed_token_ids": (None, "a restricted vocabulary"),
    "truncate_prompt_tokens": (None, "truncating the prompt"),
    "logits_processors": (None, "logits processors"),
    "min_p": (0, "min-p sampling"),
    "typical_p": (1, "typical sampling"),
    "mirostat": (0, "mirostat sampling"),
    "min_tokens": (0, "a minimum length"),
    "ignore_eos": (False, "generating past the end-of-sequence token"),
    "stop_token_ids": ([], "stop token ids (give 'stop' strings)"),
    "include_stop_str_in_output": (False, "keeping the stop string"),
    "skip_special_tokens": (True, "special tokens in the text"),
    "use_beam_search": (False, "beam search"),
    "n_predict": (-1, "n_predict (OpenAI's name is max_tokens)"),
    "guided_json": (None, "constrained output"),
    "guided_regex": (None, "constrained output"),
    "guided_choice": (None, "constrained output"),
    "guided_grammar": (None, "constrained output"),
    "structured_outputs": (None, "constrained output"),
    "json_schema": (None, "constrained output"),
    "grammar": (None, "constrained output"),
}


# The request fields this API reads, refuses or accepts at their neutral value; others are
# ignored, as OpenAI-compatible servers do with vendor extensions, and named in the log.
HANDLED = {
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
    "stop", "stream", "stream_options", "n", "user", "response_format", "best_of", "parallel_tool_calls",
    "chat_template_kwargs", "reasoning_effort", "continue_final_message", "add_generation_prompt",
    *UNSUPPORTED, *UNSUPPORTED_BUT,
}  # fmt: skip


def neutral(value, default) -> bool:
    """Whether a field's ``value`` asks nothing of what it would change: absent, empty, or
    its ``default`` (``true`` is not 1 here; ``""`` is nothing where the default is null)."""
    if value is None or value == [] or (default is None and value == ""):
        return True
    return value == default and isinstance(value, bool) == isinstance(default, bool)


def ignored_fields(body: dict, most: int = 8) -> str:
    """The request's fields this API ignores, for the log: each name printable (a key is
    any JSON string: no line breaks or escape codes reach the operator's terminal), at
    most ``most`` of them, "" for none."""
    names = sorted(set(body) - HANDLED)
    shown = [printable(n) for n in names[:most]]
    return ", ".join(shown) + (f" and {len(names) - most} more" if len(names) > most else "")


def refuse_unsupported(body: dict, chat: bool = True) -> None:
    """400 for a field asking what moespeq does not do (its neutral values pass: false,
    0, empty, ``response_format`` text, ``best_of`` 1; a completion's ``logprobs: 0`` asks
    for the chosen tokens' log probabilities)."""
    for name, what in UNSUPPORTED.items():
        v = body.get(name)
        if name == "logprobs" and not chat:  # (an integer there: 0 asks for the chosen tokens')
            asks = v is not None and v is not False
        else:
            asks = v not in (None, False, 0, "", [], {})
        if asks:
            raise ApiError(400, f"'{name}' is not supported by moespeq ({what}); leave it out", "unsupported", name)
    for name, (default, what) in UNSUPPORTED_BUT.items():
        if not neutral(body.get(name), default):
            which = "" if default is None else f" other than {json.dumps(default)}"
            raise ApiError(400, f"'{name}'{which} is not supported by moespeq ({what})", "unsupported", name)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(
            400, "'response_format' other than text is not supported by moespeq", "unsupported", "response_format"
        )
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "'best_of' other than 1 is not supported by moespeq", "unsupported", "best_of")


def parse_options(body: dict, prompt_len: int, context: int, default_max: int, chat: bool = True):
    """max_tokens, sampling, stop strings, stream flags, validated as OpenAI does (a
    too-long prompt's error names the field the prompt came in). ``top_k`` is vLLM's and
    llama.cpp's (0 and -1: off)."""
    prompt_param = "messages" if chat else "prompt"
    from moespeq_cli.runtime.sampling import SamplingParams

    def number(name, lo, hi, default, integer=False):
        v = body.get(name, default)
        if v is None:
            return default
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if not ok or isinstance(v, bool) or not lo <= v <= hi:
            kind = "an integer" if integer else "a number"
            got = json.dumps(v)[:40]  # as the client sent it (true, not Python's True)
            raise ApiError(400, f"'{name}' must be {kind} from {lo} to {hi}, got {got}", "invalid_value", name)
        return v

    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "invalid_value", "stream_options")
    n = body.get("n")  # null: the default, 1
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n != 1):
        raise ApiError(400, "only n=1 is supported", "invalid_value", "n")
    refuse_unsupported(body, chat)
    room = context - prompt_len
    if room < 1:
        raise ApiError(
            400,
            f"the prompt ({counted(prompt_len, 'token')}) leaves no room for an answer in the context of {context}; shorten it",
            "context_length_exceeded",
            prompt_param,
        )
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(key, 1, 2**31 - 1, None, integer=True)
    if max_tokens is None:
        max_tokens = min(room, default_max)
    elif max_tokens > room:
        raise ApiError(
            400,
            f"the prompt ({counted(prompt_len, 'token')}) plus {key} {max_tokens} exceeds the context of {context} tokens",
            "context_length_exceeded",
            key,
        )
    temperature = number("temperature", 0, 2, 1.0)
    top_p = number("top_p", 0, 1, 1.0)  # 0: only the most likely token
    top_k = max(0, number("top_k", -1, 2**31 - 1, 0, integer=True))
    seed = number("seed", -(2**63), 2**63 - 1, None, integer=True)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"'stop' must be a string or a list of up to {MAX_STOPS} strings", "invalid_value", "stop")
    stream = body.get("stream")
    stream = False if stream is None else stream  # null: the default, as for the other fields
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "invalid_value", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise ApiError(
            400, "'stream_options' must be an object like {\"include_usage\": true}", "invalid_value", "stream_options"
        )
    sampling = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=top_k, seed=seed)
    return max_tokens, sampling, stops, stream, bool(opts.get("include_usage"))


def chat_messages(body: dict) -> list[dict]:
    """The request's messages as the chat template takes them: text content (parts joined
    by a newline, as vLLM joins them), ``developer`` as ``system``, a participant's
    ``name`` kept. Tool calls and tool results are refused, as ``tools`` is (400)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_value", "messages")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") in ("tool", "function"):
            raise ApiError(
                400,
                f"messages[{i}] is a {m['role']} result: tool calls are not supported by moespeq",
                "unsupported",
                "messages",
            )
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a 'role' among {', '.join(ROLES)}", "invalid_value", "messages")
        for name in ("tool_calls", "function_call"):
            if m.get(name) not in (None, []):
                raise ApiError(
                    400, f"messages[{i}].{name}: tool calls are not supported by moespeq", "unsupported", "messages"
                )
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise ApiError(400, f"messages[{i}] has content that is not text", "invalid_value", "messages")
            content = "\n".join(p["text"] for p in content)
        if content is None and m["role"] == "assistant":  # OpenAI's: an assistant turn with nothing said
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] needs 'content' as a string", "invalid_value", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        message = {"role": role, "content": content}
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        out.append(message)
    return out


def template_variables(body: dict) -> dict:
    """What a chat request gives its template besides the messages: the entries of
    ``chat_template_kwargs`` (``enable_thinking``: Qwen3's switch), and ``reasoning_effort``
    (gpt-oss's template reads it), as vLLM passes them; none may replace what moespeq
    passes or the template's environment defines (chat_template.py ``RESERVED``)."""
    extra = body.get("chat_template_kwargs")
    if extra is None:
        extra = {}
    if not isinstance(extra, dict) or not all(isinstance(k, str) and k.isidentifier() for k in extra):
        raise ApiError(
            400, "'chat_template_kwargs' must be an object of names", "invalid_value", "chat_template_kwargs"
        )
    if taken := sorted(RESERVED & set(extra)):
        raise ApiError(
            400, f"'chat_template_kwargs' may not set {', '.join(taken)}", "invalid_value", "chat_template_kwargs"
        )
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in ("minimal", "low", "medium", "high"):
            raise ApiError(
                400, "'reasoning_effort' must be minimal, low, medium or high", "invalid_value", "reasoning_effort"
            )
        extra = {**extra, "reasoning_effort": effort}
    return extra


def lone_surrogate(body: dict) -> str | None:
    """The top-level field of a parsed request that holds a lone surrogate (JSON's
    ``"\\ud800"`` decodes to one: no tokenizer can encode it), or None."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    for top, value in body.items():
        stack = [top, value]
        while stack:  # (no recursion: a body may be nested as deep as the parser allows)
            v = stack.pop()
            if isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return printable(top)
            elif isinstance(v, dict):
                stack.extend(v.keys())
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(v)
    return None


CHAT_ONLY = ("messages", "chat_template_kwargs", "reasoning_effort", "continue_final_message", "add_generation_prompt")


def refuse_the_other_endpoints(body: dict, chat: bool) -> None:
    """400 for a field of the other endpoint: a chat request's ``prompt``, a completion's
    ``messages`` or template options (dropped, they would change nothing the client sees)."""
    for key in ("prompt",) if chat else CHAT_ONLY:
        if body.get(key) is not None:
            there, here = ("/v1/completions", "'messages'") if chat else ("/v1/chat/completions", "'prompt'")
            raise ApiError(400, f"'{key}' is for {there}; this endpoint takes {here}", "invalid_value", key)


def assistant_turn(body: dict, messages: list[dict]) -> dict:
    """How the prompt ends, as vLLM asks it: ``add_generation_prompt`` (default true: the
    template opens the assistant's turn) or ``continue_final_message`` (the answer goes on
    from a final assistant message, a "prefill": ``{`` to start JSON)."""
    flags = {}
    for key, default in (("continue_final_message", False), ("add_generation_prompt", None)):
        v = body.get(key)
        if v is not None and not isinstance(v, bool):
            raise ApiError(400, f"'{key}' must be true or false", "invalid_value", key)
        flags[key] = default if v is None else v
    go_on = flags["continue_final_message"]
    if go_on and flags["add_generation_prompt"]:
        raise ApiError(
            400,
            "'continue_final_message' and 'add_generation_prompt' cannot both be true (the answer either continues "
            "the last message or starts a new turn)",
            "invalid_value",
            "continue_final_message",
        )
    if go_on and (messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip()):
        raise ApiError(
            400,
            "'continue_final_message' continues a final assistant message with text; the last message is "
            + ("empty" if messages[-1]["role"] == "assistant" else f"the {messages[-1]['role']}'s"),
            "invalid_value",
            "continue_final_message",
        )
    add = not go_on if flags["add_generation_prompt"] is None else flags["add_generation_prompt"]
    return {"add_generation_prompt": add, "continue_final": go_on}


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise ApiError(
            400, f"one prompt a request: got a list of {len(prompt)}; send them one by one", "invalid_value", "prompt"
        )
    if isinstance(prompt, list) and prompt and all(isinstance(p, int | list) for p in prompt):
        raise ApiError(400, "prompts of token ids are not supported; send the text", "invalid_value", "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string", "invalid_value", "prompt")
    return prompt


def loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, as bound or as a Host header's without
    its port) is this machine's loopback: ``localhost`` (and RFC 6761's ``*.localhost``),
    127.0.0.0/8, ::1."""
    import ipaddress
    import socket

    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:  # IPv4's short forms, as a browser normalises them (127.1, 0x7f.1)
            ip = ipaddress.ip_address(socket.inet_aton(host))
        except (OSError, ValueError):
            return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def host_name(header: str) -> str:
    """The name of a Host header, without its port (``[::1]:8000`` -> ``::1``)."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class Gate:
    """ASGI middleware in front of the routes. A trailing slash is dropped (``/health/``
    is ``/health``: no redirect to a URL built from the Host header). A server bound to
    loopback answers only requests addressed to a loopback name: a web page's DNS
    rebinding (its own name re-pointed at 127.0.0.1, to read the answers) is refused with
    403. Bound to another address, the operator chose who may reach it (``--api-key``)."""

    def __init__(self, app, bind: str, log, address: str | None = None):
        # checked where the socket is bound to loopback (its address, not the name given:
        # `--host ip6-localhost` or the machine's own name bind loopback too)
        self.app, self.check, self.bind, self.log = app, loopback(address or bind), bind, log

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]
            if len(path) > 1 and path.endswith("/"):
                scope = dict(scope, path=path.rstrip("/") or "/")
            host = dict(scope.get("headers") or []).get(b"host")
            name = host_name(host.decode("latin-1")) if host else None
            if self.check and name is not None and not loopback(name) and name != self.bind:
                from starlette.responses import JSONResponse

                shown = printable(name, 60)
                e = ApiError(
                    403,
                    f"this server on {self.bind} answers requests for localhost only, not for {shown!r} (a web page "
                    "reaching it through its own name is refused); a proxy in front must send its own Host "
                    "(nginx's default)",
                    "host_not_allowed",
                )
                self.log(scope.get("method", "?"), scope["path"], 403, e.message)
                await JSONResponse(e.body(), status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(
    engine,
    name: str,
    context: int,
    api_key: str | None = None,
    queue_size: int = 16,
    default_max: int = 512,
    bind: str = "127.0.0.1",
    address: str | None = None,
):
    """The Starlette application serving ``engine`` as model ``name`` on ``bind`` (the
    ``--host`` given; ``address``: the address its socket is bound to, where they differ)."""
    from concurrent.futures import ThreadPoolExecutor

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    worker = Worker(engine, queue_size)
    halted = asyncio.Event()  # the server is shutting down (``HaltingServer.handle_exit``)
    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moespeq-encode")  # one at a time: off the loop
    created = int(time.time())

    def log_line(method: str, path: str, status: int, extra: str = "") -> None:
        sys.stderr.write(f"{method} {path} {status}{' · ' + extra if extra else ''}\n")
        sys.stderr.flush()

    def log(request, status: int, extra: str = "") -> None:
        log_line(request.method, request.url.path, status, extra)

    def error(request, e: ApiError, detail: str = ""):
        log(request, e.status, e.message + (f" ({detail})" if detail else ""))  # (the detail: for the operator)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)

    def check_key(request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 9110), the key is not
        if not (scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), api_key.encode())):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")

    async def read_json(request) -> dict:
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
            # a web page may send a form or text/plain to 127.0.0.1 without asking (no CORS
            # preflight): a body is read as JSON only when it says it is
            raise ApiError(
                415,
                f"the request body must be JSON, sent with 'Content-Type: application/json' (got {media[:60] or 'none'}); "
                "with curl, add -H 'Content-Type: application/json'",
                "unsupported_media_type",
            )
        too_big = ApiError(413, f"the request body is over {MAX_BODY // 2**20} MiB", "request_too_large")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY:
            raise too_big

        async def collect() -> bytes:
            chunks, total = [], 0
            async for chunk in request.stream():  # chunked bodies too: never more than MAX_BODY held
                total += len(chunk)
                if total > MAX_BODY:
                    raise too_big
                chunks.append(chunk)
            return b"".join(chunks)

        # a shutdown while the body is coming answers 503: a client that stalls mid-upload
        # held Ctrl-C and SIGTERM as long as it stalled
        reading, stop = asyncio.ensure_future(collect()), asyncio.ensure_future(halted.wait())
        try:
            await asyncio.wait({reading, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not reading.done():
                reading.cancel()
        if not reading.done():
            raise shutting_down()
        raw = reading.result()  # (ClientDisconnect: the client left mid-upload)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON", "invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the request body's JSON is nested too deeply", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", "invalid_json")
        if (where := lone_surrogate(body)) is not None:
            raise ApiError(
                400,
                f"'{where}' is not valid Unicode text (it holds a lone surrogate, \\ud800-\\udfff); send UTF-8 text",
                "invalid_value",
                where,
            )
        if body.get("model") is not None:
            check_model(body["model"])
        return body

    def check_model(asked) -> None:
        if not isinstance(asked, str):
            got = json.dumps(asked)
            raise ApiError(400, f"'model' must be a string, got {got[:40]}", "invalid_value", "model")
        if asked != name:
            raise ApiError(404, f"the model {asked!r} does not exist here; this server has {name!r}", "model_not_found")

    async def health(request):
        return JSONResponse({"status": "ok", "model": name})

    card = {"id": name, "object": "model", "created": created, "owned_by": "moespeq"}

    async def models(request):
        try:
            check_key(request)
        except ApiError as e:
            return error(request, e)
        return JSONResponse({"object": "list", "data": [card]})

    async def model(request):
        """One model's card (the openai client's ``models.retrieve``); ``/v1/models/`` is
        the list."""
        if not request.path_params["model"]:
            return await models(request)
        try:
            check_key(request)
            check_model(request.path_params["model"])
        except ApiError as e:
            return error(request, e)
        return JSONResponse(card)

    async def generate(request, chat: bool):
        try:
            check_key(request)
            body = await read_json(request)
            tok = engine.tokenizer
            refuse_the_other_endpoints(body, chat)
            if chat:
                messages = chat_messages(body)
                variables = template_variables(body)
                turn = assistant_turn(body, messages)
                text = "".join(m["content"] for m in messages)
            else:
                text = completion_prompt(body)
            if tok.min_tokens(text) > context:  # refused by arithmetic, before any tokenizing
                raise ApiError(
                    400,
                    f"the prompt is longer than the context of {context} tokens; shorten it",
                    "context_length_exceeded",
                    "messages" if chat else "prompt",
                )
            encode = (lambda: tok.encode_messages(messages, variables, **turn)) if chat else (lambda: tok.encode(text))
            prompt_ids = await asyncio.get_running_loop().run_in_executor(encoder, encode)
            if not prompt_ids:
                raise ApiError(
                    400,
                    "the chat template renders these messages as an empty prompt"
                    if chat and tok.chat_template
                    else "the prompt encodes to no tokens",
                    "invalid_value",
                    "messages" if chat else "prompt",
                )
            max_tokens, sampling, stops, stream, include_usage = parse_options(
                body, len(prompt_ids), context, default_max, chat
            )
        except ApiError as e:
            return error(request, e)
        except ClientDisconnect:  # before its body was all sent: nobody to answer
            log(request, 499, "cancelled: the client went away while sending the request")
            return Response(status_code=499)
        except TemplateError as e:  # the template refused these messages (its raise_exception), or failed on them
            if e.refused:
                return error(
                    request,
                    ApiError(
                        400,
                        f"the model's chat template refused these messages: {e.detail}",
                        "invalid_value",
                        "messages",
                    ),
                )
            return error(
                request,
                ApiError(500, f"the model's chat template failed on these messages ({e.detail})", "template_error"),
            )
        except Exception as e:  # noqa: BLE001 - a template or tokenizer failure on this input
            refused = ApiError(400, "cannot encode the request's text with this model's tokenizer", "invalid_value")
            return error(request, refused, str(e)[:200])  # (its paths stay in the server's log)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        job = Job(
            prompt_ids, max_tokens, sampling, stops, channels=chat and bool(tok.chat_template)
        )  # completions: raw
        if stream:
            job.on_text = lambda t: loop.call_soon_threadsafe(pieces.put_nowait, t)
            if chat:  # reasoning as vLLM and llama.cpp stream it: ``delta.reasoning_content``
                job.on_reasoning = lambda t: loop.call_soon_threadsafe(pieces.put_nowait, (REASONING, t))
        job.notify = lambda: loop.call_soon_threadsafe(pieces.put_nowait, None)  # after every piece: FIFO
        started = asyncio.Event()  # a stream's 200 goes out once its generation starts
        job.on_start = lambda: loop.call_soon_threadsafe(started.set)
        try:
            worker.submit(job)
        except ApiError as e:
            return error(request, e)

        def usage() -> dict:
            n = len(job.answer.token_ids)
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        def finish_log(status: int) -> None:
            s = job.stats or {}
            tps = s.get("tokens_per_s")
            parts = [counted(len(job.answer.token_ids), "token")]
            if tps:
                parts.append(f"{tps:.1f} tok/s ({s.get('clock')} clock)")
            if s.get("acceptance_rate") is not None:
                parts.append(f"accept {s['acceptance_rate']:.0%}")
            if s.get("expert_hit_rate") is not None:
                parts.append(f"hit rate {s['expert_hit_rate']:.0%}")
            if job.cancelled:
                parts.append("cancelled: the client went away")
            if stream and job.error is not None:  # said in an event after the stream's 200
                parts.append(f"ended by an error event: {getattr(job.error, 'message', job.error)}")
            if ignored := ignored_fields(body):
                parts.append("ignored: " + ignored)
            log(request, status, " · ".join(parts))

        if not stream:
            try:
                while not job.done.is_set():
                    try:
                        await asyncio.wait_for(pieces.get(), timeout=0.25)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            job.cancelled = True
            finally:  # cancelled (a shutdown, the client gone): the worker drops the job
                if not job.done.is_set():
                    job.cancelled = True
            if isinstance(job.error, ApiError):  # the server stopping: logged by ``error``
                return error(request, job.error)
            if job.error is not None:
                finish_log(500)
                return JSONResponse(
                    {
                        "error": {
                            "message": f"generation failed: {job.error}",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    },
                    status_code=500,
                )
            if job.cancelled:  # the client went away: logged as a streaming answer's would be
                finish_log(499)
                return Response(status_code=499)
            a = job.answer
            choice = {"index": 0, "finish_reason": a.finish_reason, "logprobs": None}
            message = {"role": "assistant", "content": a.text, "refusal": None} | (
                {"reasoning_content": a.reasoning} if a.reasoning else {}
            )
            choice |= {"message": message} if chat else {"text": a.text}
            finish_log(200)
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": int(time.time()),
                    "model": name,
                    "choices": [choice],
                    "usage": usage(),
                    "moespeq": job.stats or {},
                }
            )

        waiting = asyncio.ensure_future(started.wait())
        try:  # in the queue: a shutdown is still a 503, and a client that leaves is dropped
            while not (await asyncio.wait({waiting}, timeout=0.25))[0]:
                if await request.is_disconnected():
                    job.cancelled = True
                    finish_log(499)
                    return Response(status_code=499)
        except BaseException:  # this handler cancelled (uvicorn's shutdown timeout): nobody will read
            job.cancelled = True
            raise
        finally:
            waiting.cancel()
        if not job.running and isinstance(job.error, ApiError):  # dropped before it started
            return error(request, job.error)

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list, **extra) -> str:
            data = {"id": rid, "object": chunk_obj, "created": int(time.time()), "model": name, "choices": choices}
            if include_usage:  # null but in the last chunk, as OpenAI sends it
                data["usage"] = None
            return "data: " + json.dumps(data | extra) + "\n\n"

        def piece(text: str | None, finish: str | None = None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        async def events():
            try:
                if chat:
                    first = piece("")
                    first["delta"]["role"] = "assistant"
                    yield event([first])
                while (text := await pieces.get()) is not None:
                    if isinstance(text, tuple):  # (REASONING, text)
                        reasoning = {"index": 0, "delta": {"reasoning_content": text[1]}, "finish_reason": None}
                        yield event([reasoning | {"logprobs": None}])
                    else:
                        yield event([piece(text)])
                if isinstance(job.error, ApiError):
                    yield "data: " + json.dumps(job.error.body()) + "\n\n"
                elif job.error is not None:
                    err = {
                        "message": f"generation failed: {job.error}",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                    yield "data: " + json.dumps({"error": err}) + "\n\n"
                else:
                    yield event([piece(None, job.answer.finish_reason)], moespeq=job.stats or {})
                    if include_usage:
                        yield event([], usage=usage())
                yield "data: [DONE]\n\n"
                finish_log(200)
            finally:
                if not job.done.is_set():  # the client went away mid-answer
                    job.cancelled = True
                    finish_log(499)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def completions(request):
        return await generate(request, chat=False)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.loop = asyncio.get_running_loop()  # where a signal handler sets ``halted``
        yield
        worker.stop()
        encoder.shutdown(wait=False, cancel_futures=True)

    async def http_error(request, exc: HTTPException):
        """Starlette's own 404 (no such route) and 405 (wrong method), as OpenAI errors; under
        /v1/ the key is checked first, as OpenAI does (no route is told to a client without it)."""
        try:
            if request.url.path.startswith("/v1/"):
                check_key(request)
        except ApiError as e:
            return error(request, e)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error(request, ApiError(exc.status_code, message, headers=exc.headers))  # (405: Allow)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
        middleware=[Middleware(Gate, bind=bind, log=log_line, address=address)],
    )
    app.router.redirect_slashes = False  # (the Gate drops trailing slashes)
    app.state.worker = worker
    app.state.halted = halted  # set by Ctrl-C or SIGTERM (``HaltingServer.handle_exit``)
    return app
