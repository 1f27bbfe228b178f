"""Chat templates rendered with limits: a checkpoint's template is code from whoever made
the checkpoint, so it runs in Jinja2's immutable sandbox (no attribute tricks, no
mutation of what it is given) and, beyond the sandbox, within bounds on

- time: a trace function checks a deadline on every line the template's compiled code
  runs (``{% for %}`` nested a million deep stops after ``TIME_LIMIT_S``);
- size: ``*`` and ``**`` on strings, lists and numbers, ``%`` and ``format`` widths,
  and every integer handed to a filter or a method (``center(2000000000)``) are
  checked *before* the operation, so no single step allocates gigabytes; the rendered
  text is bounded as it streams;
- recursion: a recursive macro ends in RecursionError, reported like the rest.

Any violation, and any failure of the template, is a ``TemplateError`` that names the
template: its message says what `run` offers (--no-chat); ``what`` is the failure alone,
for `chat` and `serve` to say what they offer. ``check_compiles`` finds, before any
message, what no conversation can render (a syntax error, an unknown filter).
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import re
import sys
import time

from moespeq_cli.errors import CheckpointError


class TemplateError(CheckpointError):
    """A chat template that failed; ``what``: the failure without a remedy, naming the
    template; ``detail``: the failure alone (what a server tells a client: not the path);
    ``refused``: the template refused its input on purpose (its ``raise_exception``:
    "System role not supported"), which is the messages' fault, not the template's."""

    def __init__(self, what: str, detail: str = "", refused: bool = False):
        super().__init__(f"{what}; use --no-chat (or fix the template)")
        self.what, self.detail, self.refused = what, detail or what, refused


TIME_LIMIT_S = 1.0
ITEM_LIMIT = 1_000_000  # characters or items one operation may produce
OUTPUT_SLACK = 1 << 20  # rendered text beyond what the messages themselves hold
_WIDTH = re.compile(r"\d{7,}")  # a format width of a million or more


class TemplateLimit(Exception):
    """The template exceeded a bound (time, size, recursion)."""


def _size(v) -> int:
    return len(v) if isinstance(v, str | bytes | list | tuple) else 0


def _weight(v, cap: int) -> int:
    """About the characters ``v`` renders to (its strings' lengths and a few an item,
    through lists and dicts), counted up to just past ``cap``: what a repetition or a
    JSON dump of it produces, known before it is made (``[s] * 10**6`` is a million items
    but a million times ``s`` rendered)."""
    total, stack = 0, [v]
    while stack and total <= cap:
        x = stack.pop()
        if isinstance(x, str | bytes):
            total += len(x) + 2
        elif isinstance(x, list | tuple):
            total += len(x) + 2
            stack.extend(x[: cap - total + 1])
        elif isinstance(x, dict):
            total += 2 * len(x) + 2
            stack.extend(list(x.items())[: cap - total + 1])
        else:
            total += 8
    return total


def _check_format(s) -> None:
    if isinstance(s, str) and _WIDTH.search(s):
        raise TemplateLimit("a format width too large for a template")


def _environment(big: int):
    """A sandbox in which no single operation may produce more than ``big`` items."""
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    def check_value(v) -> None:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > ITEM_LIMIT:
            raise TemplateLimit(f"a number too large for a template ({v})")
        if _size(v) > big:
            raise TemplateLimit("a value too large for a template")

    class BoundedNamespace(Namespace):  # `{% set ns.s = ns.s ~ ns.s %}` in a loop doubles
        def __setitem__(self, name, value):
            check_value(value)
            super().__setitem__(name, value)

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                n, seq = (right, left) if _size(left) else (left, right)
                if _size(seq) and isinstance(n, int) and _weight(seq, big) * n > big:
                    raise TemplateLimit("a repetition too large for a template")
            elif operator == "**":
                if isinstance(right, int | float) and isinstance(left, int | float):
                    if abs(left) > 1 and right * math.log2(abs(left)) > 4096:
                        raise TemplateLimit("a power too large for a template")
            elif operator == "%":
                _check_format(left)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's signature
            for v in (*args, *kwargs.values()):
                check_value(v)  # also a macro's arguments: recursion that doubles a string
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value):  # 'x'.format / format_map, at attribute access
            if getattr(value, "__name__", "") in ("format", "format_map"):
                _check_format(getattr(value, "__self__", None))
            return super().wrap_str_format(value)

    def bounded_filter(f):
        @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
        def bounded(*args, **kwargs):
            for v in (*args[1:], *kwargs.values()):
                check_value(v)
            if f.__name__ == "do_format" and args:
                _check_format(args[0])
            out = f(*args, **kwargs)
            if _size(out) > big:
                raise TemplateLimit("a filter result too large for a template")
            return out

        return bounded

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}``: transformers marks the assistant's
        tokens with it (for training masks); rendering, it is its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    # the environment transformers renders templates in (chat_template_utils.py): its
    # extensions ({% break %}, {% continue %}, {% generation %}), its JSON (not HTML-escaped,
    # keys in order, non-ASCII kept) and today's date
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationBlock])

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        """transformers' tojson, its output's size bounded before it is made (json's C
        encoder runs past the time limit's checks)."""
        pad = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
        seps = sum(len(s) for s in separators if isinstance(s, str)) if isinstance(separators, list | tuple) else 0
        if abs(pad) > 64 or seps > 64:
            raise TemplateLimit("a JSON indent or separator too large for a template")
        if _weight(x, big) * (4 + seps + abs(pad)) > 4 * big:
            raise TemplateLimit("a value too large to write as JSON in a template")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    for name, f in list(env.filters.items()):
        env.filters[name] = bounded_filter(f)
    env.globals["namespace"] = BoundedNamespace
    env.globals["strftime_now"] = strftime_now
    return env


def strftime_now(fmt: str) -> str:
    _check_format(fmt)
    return datetime.datetime.now().strftime(fmt)


def render(template: str, where: str, /, **variables) -> str:
    """Render ``template`` with ``variables`` within the bounds above (``where`` names it
    in errors; a variable may be called ``template`` or ``where`` too)."""
    import jinja2

    class Refused(jinja2.TemplateError):
        pass

    leaves = [len(v) for v in _leaves(variables) if isinstance(v, str)]
    env = _environment(max([ITEM_LIMIT, *(2 * n for n in leaves)]))

    def raise_exception(msg: str):
        raise Refused(msg)

    env.globals["raise_exception"] = raise_exception
    limit = OUTPUT_SLACK + 4 * sum(leaves)
    deadline = time.monotonic() + TIME_LIMIT_S

    def tracer(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateLimit(f"it ran longer than {TIME_LIMIT_S:g} s")
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        parts, total = [], 0
        for chunk in env.from_string(template).generate(**variables):
            parts.append(chunk)
            total += len(chunk)
            if total > limit:
                raise TemplateLimit(f"its output passed {limit} characters")
        return "".join(parts)
    except Refused as e:
        raise TemplateError(f"{where} refused the messages ({str(e)[:120]})", str(e)[:120], refused=True) from None
    except TemplateLimit as e:
        raise TemplateError(f"{where} was stopped: {e}", f"it was stopped: {e}") from None
    except RecursionError:
        raise TemplateError(f"{where} recursed too deeply", "it recursed too deeply") from None
    except MemoryError:
        raise TemplateError(f"{where} ran out of memory", "it ran out of memory") from None
    except jinja2.TemplateError as e:
        raise TemplateError(f"{where} failed ({str(e)[:120]})", str(e)[:120]) from None
    except Exception as e:  # noqa: BLE001 - a template is foreign code: any failure is its own
        detail = f"{type(e).__name__}: {str(e)[:120]}"
        raise TemplateError(f"{where} failed ({detail})", detail) from None
    finally:
        sys.settrace(previous)


# what a template reads besides a request's own variables: moespeq's arguments, the
# globals the environment gives it, and Jinja's own names
RESERVED = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token", "raise_exception"}
    | {"strftime_now", "namespace", "range", "dict", "lipsum", "cycler", "joiner", "self", "loop", "super"}
    | {"caller", "varargs", "kwargs", "true", "false", "none", "True", "False", "None"}
)


def check_compiles(template: str, where: str) -> None:
    """``TemplateError`` where ``template`` cannot render any conversation: a syntax error
    or an unknown filter or test (Jinja finds both when it compiles)."""
    import jinja2

    try:
        _environment(ITEM_LIMIT).from_string(template)
    except jinja2.TemplateError as e:
        raise TemplateError(f"{where} does not compile ({str(e)[:120]})", str(e)[:120]) from None
    except RecursionError:
        raise TemplateError(f"{where} does not compile (nested too deeply)", "nested too deeply") from None


def _leaves(v):
    if isinstance(v, dict):
        for x in v.values():
            yield from _leaves(x)
    elif isinstance(v, list | tuple):
        for x in v:
            yield from _leaves(x)
    else:
        yield v
