"""An OpenAI request read and checked: the fields moespeq honours, those it refuses
(400 where they would change the answer) or accepts at their neutral value, the chat
messages as the template takes them, and a completion's prompt."""

from __future__ import annotations

import json

from moespeq_cli.chat_template import RESERVED
from moespeq_cli.server.errors import ApiError
from moespeq_cli.text import counted, printable

MAX_STOPS = 4
ROLES = ("system", "user", "assistant", "developer")


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
    if "" in stops:  # (it would stop nothing: refused, as `chat --stop ""` is)
        raise ApiError(
            400, "'stop' holds an empty string; give the text an answer stops before", "invalid_value", "stop"
        )
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
