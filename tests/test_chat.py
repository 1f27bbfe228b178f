"""``moespeq chat`` through a pipe, and the conversation core shared with ``serve``."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from moespeq_cli.cli.app import app
from moespeq_cli.conversation import StopMatcher

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def chat_ckpt(tiny, tmp_path):
    """The tiny Mixtral with a chat template."""
    src, _ = tiny("mixtral", "gqa")
    dst = tmp_path / "chat"
    shutil.copytree(src, dst)
    (dst / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return dst


def chat(path, text, *args, code: int = 0):
    """``code``: 1 where a line gets no answer (a script learns it by the exit code)."""
    r = CliRunner().invoke(app, ["chat", str(path), "--backend", "cpu", "-n", "8", *args], input=text)
    assert r.exit_code == code, (r.stdout, r.stderr)
    return r


def reference(path, rendered: str, n: int = 8) -> str:
    """What run gives for the conversation rendered by hand (the same engine, greedy)."""
    from moespeq_cli.runtime.engine import Engine, EngineOptions
    from moespeq_cli.runtime.sampling import SamplingParams

    eng = Engine(path, EngineOptions(backend="cpu"))
    ids = eng.tokenizer.encode(rendered) if not rendered.startswith("<|") else eng.tokenizer._encode(rendered, False)
    eng.load(len(ids) + n)
    toks = []
    for ev in eng.generate(ids, n, SamplingParams()):
        if ev.eos:
            break
        toks.append(ev.token)
    return eng.tokenizer.decode(toks)


def test_piped_conversation_keeps_the_history(chat_ckpt):
    r = chat(chat_ckpt, "hello\nand then\n")
    first = reference(chat_ckpt, "<|user|>hello\n<|assistant|>")
    second = reference(chat_ckpt, f"<|user|>hello\n<|assistant|>{first}\n<|user|>and then\n<|assistant|>")
    assert r.stdout == f"{first}\n\n{second}\n"  # answers apart by a blank line (each may hold lines)


def test_crlf_lines_are_the_same_messages(chat_ckpt):
    """A conversation saved on Windows: the carriage return is not part of a message. (A
    real pipe: the test runner's input stream translates newlines, a process's does not.)"""
    import subprocess
    import sys

    def piped(data: bytes) -> bytes:
        cmd = [sys.executable, "-m", "moespeq_cli", "chat", str(chat_ckpt), "--backend", "cpu", "-n", "8"]
        r = subprocess.run(cmd, input=data, capture_output=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert piped(b"\xef\xbb\xbfhello\r\nand then\r\n/exit\r\n") == piped(b"hello\nand then\n")  # BOM too


def test_json_lines_one_object_per_answer(chat_ckpt):
    """--json: a script piping a conversation reads each answer whole, whatever its text."""
    r = chat(chat_ckpt, "hello\n/stats\nand then\n", "--json")
    first = reference(chat_ckpt, "<|user|>hello\n<|assistant|>")
    second = reference(chat_ckpt, f"<|user|>hello\n<|assistant|>{first}\n<|user|>and then\n<|assistant|>")
    answers = [json.loads(line) for line in r.stdout.splitlines()]  # stdout holds nothing else
    assert [(a["turn"], a["content"], a["interrupted"]) for a in answers] == [(1, first, False), (2, second, False)]
    assert [a["reasoning"] for a in answers] == [None, None]  # every record has the key, as run --json's
    assert all(a["stats"]["new_tokens"] == len(a["token_ids"]) > 0 for a in answers)
    assert all(a["finish_reason"] == ("length" if len(a["token_ids"]) == 8 else "stop") for a in answers)
    assert "tokens in" in r.stderr  # /stats still answers, on stderr


def test_reset_forgets_and_commands_answer(chat_ckpt):
    r = chat(chat_ckpt, "hello\n/stats\n/reset\nhello\n/nope\n/exit\nnever read\n", code=1)  # (/nope)
    first = reference(chat_ckpt, "<|user|>hello\n<|assistant|>")
    assert r.stdout == f"{first}\n\n{first}\n"  # after /reset the same question, the same answer (a blank line between)
    assert "tokens in" in r.stderr and "history cleared" in r.stderr and "unknown command /nope" in r.stderr
    assert (
        r.stderr.splitlines()[-1]
        == "moespeq: error: 1 of the conversation's lines got no answer (line 5; each said above)"
    )


def test_stop_string_cuts_the_answer(chat_ckpt):
    full = reference(chat_ckpt, "<|user|>hello\n<|assistant|>")
    stop = full[2:4]
    assert stop and full.find(stop) >= 0
    r = chat(chat_ckpt, "hello\n", "--stop", stop)
    assert r.stdout == full[: full.find(stop)] + "\n"
    answer = json.loads(chat(chat_ckpt, "hello\n", "--stop", stop, "--json").stdout)
    assert answer["content"] == full[: full.find(stop)] and answer["finish_reason"] == "stop"


def test_the_demo_chats_with_its_defaults():
    """`moespeq chat` with no option (the demo, its 512-token context): an answer's
    default length leaves room to ask (it was 512, the whole context: every message was
    refused)."""
    r = CliRunner().invoke(app, ["chat", "--backend", "cpu", "--json"], input="Hello\nAnd then?\n")
    assert r.exit_code == 0, r.stderr
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert [a["turn"] for a in answers] == [1, 2]
    assert all(0 < len(a["token_ids"]) <= 256 for a in answers)


def test_old_turns_dropped_with_a_notice(chat_ckpt):
    r = chat(chat_ckpt, "a" * 40 + "\n" + "b" * 40 + "\n" + "c" * 40 + "\n", "--context", "120")
    assert "oldest messages were dropped" in r.stderr
    assert r.stdout.count("\n") == 3 + 2  # three answers, a blank line between each two


def test_plain_continuation_without_a_template(tiny):
    path, _ = tiny("mixtral", "gqa")
    r = chat(path, "hello\n")
    assert r.stdout == reference(path, "hello\n") + "\n"


@pytest.mark.parametrize(
    "chunks, stops, shown",
    [
        (["ab", "cSTOPd"], ["STOP"], "abc"),
        (["abS", "TO", "Px"], ["STOP"], "ab"),  # split across pushes: nothing of it leaks
        (["abST", "ay"], ["STOP"], "abSTay"),  # a false start is released
        (["x", "END", "y"], ["STOP", "END"], "x"),
        (["plain"], [], "plain"),
    ],
)
def test_stop_matcher(chunks, stops, shown):
    m = StopMatcher(stops)
    assert "".join(m.push(c) for c in chunks) + m.flush() == shown


def test_a_message_too_long_keeps_the_history(chat_ckpt):
    from moespeq_cli.conversation import Conversation
    from moespeq_cli.errors import UsageError
    from moespeq_cli.runtime.engine import Engine, EngineOptions

    tok = Engine(chat_ckpt, EngineOptions(backend="cpu")).tokenizer
    convo = Conversation(tok, context=100)
    convo.turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    convo.turns.append({"role": "user", "content": "x" * 500})
    with pytest.raises(UsageError, match="the model's context allows no more"):
        convo.prompt(8)
    assert convo.turns == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    convo = Conversation(tok, context=100, limit=256)  # --context could grow: said so
    convo.turns = [{"role": "user", "content": "x" * 500}]
    with pytest.raises(UsageError, match="raise --context"):
        convo.prompt(8)


@pytest.mark.parametrize("family, variant", [("mixtral", "gqa"), ("qwen3_next", "hybrid")])
def test_an_answer_stopped_inside_a_pass_keeps_what_the_next_turn_can_reuse(tiny, family, variant):
    """Ctrl-C lands inside a layer of a decoding pass (where the time goes): the cache's
    length did not advance, so the next turn reuses the conversation (a KV cache; a
    linear-attention layer that finished the pass dropped the state it started from, so
    there it starts afresh) and gives a fresh prefill's tokens."""
    from moespeq_cli.runtime.engine import Engine, EngineOptions
    from moespeq_cli.runtime.sampling import SamplingParams

    path, _ = tiny(family, variant)
    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(128)
    eng.tokenizer.eos_ids = set()
    first = list(range(3, 23))
    passes = []

    def stop_in_the_fourth_pass(module, args, output):
        passes.append(1)
        if len(passes) == 4:
            raise KeyboardInterrupt

    handle = eng.model.model.layers[1].register_forward_hook(stop_in_the_fourth_pass)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for ev in eng.generate(first, 8, SamplingParams(), reuse=True):
            got.append(ev.token)
    handle.remove()
    assert len(got) == 3  # the prompt's pass gave one, two decoding passes two more
    follow = first + got + list(range(40, 50))
    again = [ev.token for ev in eng.generate(follow, 8, SamplingParams(), reuse=True)]
    assert (eng.reused_tokens > 0) == (family == "mixtral")
    assert again == [ev.token for ev in eng.generate(follow, 8, SamplingParams(), reuse=False)]


@pytest.mark.parametrize("family, variant", [("mixtral", "gqa"), ("qwen3_next", "hybrid")])
def test_reused_prefix_gives_the_fresh_tokens(tiny, family, variant):
    """generate(reuse=True) starts from the previous call's cache where the new prompt
    shares its tokens (and only there): the same greedy tokens as a fresh prefill. A
    linear-attention model keeps its state only at the cache's end: a prompt that extends
    the whole conversation reuses it, one that shares less starts afresh."""
    from moespeq_cli.runtime.engine import Engine, EngineOptions
    from moespeq_cli.runtime.sampling import SamplingParams

    path, _ = tiny(family, variant)
    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(128)
    eng.tokenizer.eos_ids = set()

    def run(ids, reuse):
        return [ev.token for ev in eng.generate(ids, 8, SamplingParams(), reuse=reuse)]

    first = list(range(3, 23))
    answer = run(first, True)
    follow = first + answer + list(range(40, 50))
    reused = run(follow, True)
    shared = eng.reused_tokens
    assert reused == run(follow, False) and eng.reused_tokens == 0
    assert shared == len(first) + len(answer) - 1  # all but the last answer token, never fed
    run(follow, True)
    partial = follow[:12] + list(range(60, 70))
    assert run(partial, True) == run(partial, False)
    assert eng.reused_tokens == 0
    run(follow, True)
    run(partial, True)
    assert eng.reused_tokens == (12 if family == "mixtral" else 0)  # no state kept at position 12
    assert run([99, 98, 97], True) == run([99, 98, 97], False)  # nothing shared: a fresh cache


def test_every_line_without_an_answer_is_a_json_record(chat_ckpt):
    """A script reading --json lines learns of every input line that got no answer (a
    message longer than the context, bytes that are not UTF-8, an unknown /command) from
    a record with its line number; // sends a message that begins with /. (A real pipe:
    the bytes as they are.)"""
    import subprocess
    import sys

    data = b"hello\n" + b"x " * 400 + b"\n\xff not text\n/nope\n//slash\n"
    cmd = [sys.executable, "-m", "moespeq_cli", "chat", str(chat_ckpt), "--backend", "cpu", "-n", "4", "--json"]
    r = subprocess.run(cmd + ["--context", "128"], input=data, capture_output=True, timeout=300)
    assert r.returncode == 1 and b"got no answer (line 2, 3, 4;" in r.stderr.splitlines()[-1], r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec.get("line") for rec in records] == [None, 2, 3, 4, None]
    assert "do not fit" in records[1]["error"] and "UTF-8" in records[2]["error"] and "/nope" in records[3]["error"]
    assert [rec.get("turn") for rec in records] == [1, None, None, None, 2]
    first = reference(chat_ckpt, "<|user|>hello\n<|assistant|>", 4)
    assert records[4]["content"] == reference(
        chat_ckpt, f"<|user|>hello\n<|assistant|>{first}\n<|user|>/slash\n<|assistant|>", 4
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["--system", "Be brief. " * 200], "--system (about"),
        (["--stop", ""], "--stop is empty"),
        (["-n", "126"], "a short message"),  # below the context, but no message fits beside it
        (["--system", "bad \udcff byte"], "--system is not valid UTF-8"),
    ],
)
def test_chat_refuses_options_it_cannot_use_at_start(chat_ckpt, args, words):
    r = CliRunner().invoke(
        app, ["chat", str(chat_ckpt), "--backend", "cpu", "-n", "8", "--context", "128", *args], input="hi\n"
    )
    assert r.exit_code == 2 and words in r.stderr and not r.stdout, (r.stdout, r.stderr)


def test_a_context_the_chat_format_alone_fills_asks_only_for_more_context(chat_ckpt):
    """Where a short message in the chat format does not fit even without an answer,
    fewer new tokens cannot help: the remedy is a larger context alone."""
    r = CliRunner().invoke(app, ["chat", str(chat_ckpt), "--backend", "cpu", "--context", "6"], input="hi\n")
    assert r.exit_code == 2 and "raise --context" in r.stderr and "--max-new-tokens" not in r.stderr.split(";")[-1]
    r = CliRunner().invoke(app, ["chat", str(chat_ckpt), "--backend", "cpu", "--context", "128", "-n", "126"])
    assert r.exit_code == 2 and "lower --max-new-tokens or raise --context" in r.stderr


def templated_copy(tiny, tmp_path, name: str, template: str):
    src, _ = tiny("mixtral", "gqa")
    dst = tmp_path / name
    shutil.copytree(src, dst)
    (dst / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return dst


def test_a_template_that_cannot_render_is_said_with_what_chat_offers(tiny, tmp_path):
    """chat has no --no-chat: a broken template's message says what chat and run offer;
    a template that renders nothing skips the message instead of ending the session."""
    bad = templated_copy(tiny, tmp_path, "bad", "{{ messages | frobnicate }}")
    r = CliRunner().invoke(app, ["chat", str(bad), "--backend", "cpu", "-n", "4"], input="hi\n")
    assert r.exit_code == 1 and "No filter named 'frobnicate'" in r.stderr, r.stderr
    assert "`moespeq run --no-chat`" in r.stderr and "use --no-chat" not in r.stderr
    blank = templated_copy(tiny, tmp_path, "blank", "{% for m in messages %}{% endfor %}")
    r = CliRunner().invoke(app, ["chat", str(blank), "--backend", "cpu", "-n", "4", "--json"], input="hi\n")
    assert r.exit_code == 1 and "renders a conversation as an empty prompt" in r.stderr, r.stderr
    picky = templated_copy(
        tiny,
        tmp_path,
        "picky",
        "{% if messages[-1]['content'] == 'boom' %}{{ raise_exception('no boom here') }}{% endif %}" + TEMPLATE,
    )
    r = chat(picky, "boom\nhello\n", "--json", code=1)
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert "no boom here" in records[0]["error"] and records[0]["line"] == 1
    assert records[1]["turn"] == 1 and "content" in records[1]  # the session goes on, without the skipped message
    nosys = templated_copy(
        tiny,
        tmp_path,
        "nosys",
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + TEMPLATE,
    )
    r = CliRunner().invoke(app, ["chat", str(nosys), "--backend", "cpu", "--system", "Be brief."], input="hi\n")
    assert r.exit_code == 2 and "System role not supported" in r.stderr and "leave out --system" in r.stderr
    assert "fix the template" not in r.stderr
    r = CliRunner().invoke(app, ["run", str(blank), "--backend", "cpu", "-n", "2", "-p", "hi", "--chat"])
    assert r.exit_code == 1 and "renders the prompt as nothing" in r.stderr and "pass some text" not in r.stderr


def test_a_template_chat_cannot_use_is_said_before_the_weights_load(tiny, tmp_path, monkeypatch):
    """A broken template, or one refusing --system, stopped chat only after the model had
    loaded (minutes on a big model), where serve and run refuse it at once."""
    from moespeq_cli.cli import run as run_mod

    def loading(*a, **k):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(run_mod, "plan_and_load", loading)
    bad = templated_copy(tiny, tmp_path, "bad", "{% for m in messages %}{{ m.content }")
    r = CliRunner().invoke(app, ["chat", str(bad), "--backend", "cpu", "-n", "4"], input="hi\n")
    assert r.exit_code == 1 and "fix the template" in r.stderr and "weights were loaded" not in str(r.exception)
    nosys = templated_copy(
        tiny, tmp_path, "nosys", "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
    )
    r = CliRunner().invoke(app, ["chat", str(nosys), "--backend", "cpu", "--system", "Be brief."], input="hi\n")
    assert r.exit_code == 2 and "leave out --system" in r.stderr, (r.stderr, r.exception)


def test_the_end_of_sequence_token_is_counted_as_run_counts_it():
    """An answer's token_ids hold the end-of-sequence token (run's do; stats count it):
    chat's token_ids and serve's completion_tokens agree with them."""
    from types import SimpleNamespace

    from moespeq_cli.conversation import complete
    from moespeq_cli.runtime.sampling import SamplingParams

    class Engine:
        class tokenizer:
            chat_template = None

            @staticmethod
            def decode(ids):
                return "".join("ab"[i] for i in ids if i < 2)

        def generate(self, *a, **kw):
            yield from (SimpleNamespace(token=t, eos=t == 2) for t in (0, 1, 2))

    answer = complete(Engine(), [5], 8, SamplingParams())
    assert answer.token_ids == [0, 1, 2] and answer.text == "ab" and answer.finish_reason == "stop"


# ---- at a terminal (a pseudo-terminal the test holds) ----------------------------------


class Terminal:
    """``moespeq chat`` run in a pseudo-terminal: stdin and stderr always, stdout too
    unless ``stdout`` (a file) is given. ``send`` types bytes, ``expect`` waits (at most
    60 s) for text to appear and returns what came up to it."""

    def __init__(self, path, *args, stdout=None, env=None):
        import os
        import subprocess
        import sys

        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moespeq_cli", "chat", str(path), "--backend", "cpu", "-n", "4", *args],
            stdin=slave,
            stdout=slave if stdout is None else stdout,
            stderr=slave,
            env={**os.environ, "TERM": "xterm", "COLUMNS": "80", "LINES": "24", **(env or {})},
            start_new_session=True,
        )
        os.close(slave)
        self.seen = ""

    def send(self, data: bytes) -> None:
        import os

        os.write(self.master, data)

    def expect(self, text: str) -> str:
        import os
        import select
        import time

        deadline = time.monotonic() + 60
        while text not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} never came; the terminal showed {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the process ended and closed its side
                    chunk = b""
                if not chunk:
                    assert text in self.seen, f"{text!r} never came; the terminal showed {self.seen[-2000:]!r}"
                self.seen += chunk.decode("utf-8", "replace")
        at = self.seen.index(text) + len(text)
        before, self.seen = self.seen[:at], self.seen[at:]
        return before

    def close(self) -> int:
        import os

        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


def test_a_line_that_is_not_utf8_at_a_terminal_is_skipped_not_fatal(chat_ckpt, tmp_path):
    """Typed bytes that are not UTF-8 (a terminal in Latin-1, a multibyte character cut
    by a backspace where the terminal counts bytes) ended the chat with "the tokenizer is
    broken" (exit 1): the line is skipped, as from a pipe. With stdout at the terminal the
    line editor takes such a byte as a key (it inserts nothing); the chat goes on."""
    # stdout redirected: the terminal's own line editing; in a locale whose standard input
    # decodes strictly (en_US.UTF-8: an error) and in one that escapes (C.UTF-8: surrogates)
    for errors in ("strict", "surrogateescape"):
        with open(tmp_path / "answers.txt", "w") as f:
            term = Terminal(chat_ckpt, stdout=f, env={"PYTHONIOENCODING": f"utf-8:{errors}"})
            term.expect(">>> ")
            term.send(b"caf\xe9\r")
            term.expect("not valid UTF-8 text; skipped")
            term.send(b"/exit\r")
            assert term.close() == 0
    term = Terminal(chat_ckpt)
    term.expect(">>> ")
    term.send(b"caf\xe9\r")
    term.expect(">>> ")
    term.send(b"/exit\r")
    assert term.close() == 0


def test_the_arrow_keys_recall_and_edit_earlier_lines_at_a_terminal(chat_ckpt):
    term = Terminal(chat_ckpt)
    term.expect(">>> ")
    term.send(b"/stats\r")
    term.expect("(no answer yet)")
    term.expect(">>> ")
    term.send(b"\x1b[A\r")  # the up arrow: the last line again
    term.expect("(no answer yet)")
    term.expect(">>> ")
    term.send(b"/sats\x01\x1b[C\x1b[Ct\x05x\x7f\r")  # Ctrl-A, right twice, t, Ctrl-E, x, backspace: /stats
    term.expect("(no answer yet)")
    term.send(b"/exit\r")
    assert term.close() == 0


def test_with_stdout_redirected_the_prompt_stays_on_the_terminal(chat_ckpt, tmp_path):
    out = tmp_path / "answers.txt"
    with open(out, "w") as f:
        term = Terminal(chat_ckpt, stdout=f)
        term.expect(">>> ")
        term.send(b"hello\r")
        term.expect(">>> ")
        term.send(b"/help\r")
        term.expect("/reset forgets the conversation")
        term.send(b"/exit\r")
        assert term.close() == 0
    text = out.read_text()
    assert text.strip() and ">>>" not in text  # the answer alone


def test_ctrl_z_while_loading_gives_the_shell_its_cursor(chat_ckpt):
    """The loading line hides the cursor; Ctrl-Z (SIGTSTP) stopped the process with it
    hidden, so the shell's prompt had no cursor until `fg`. It is shown before the stop
    and hidden again after (here the group is orphaned, so the stop itself is discarded
    by the kernel, and the chat goes on)."""
    import os
    import signal

    term = Terminal(chat_ckpt)
    term.expect("\x1b[?25l")  # the loading line is up
    os.kill(term.proc.pid, signal.SIGTSTP)
    seen = term.expect(">>> ")
    shown = seen.find("\x1b[?25h")
    assert shown >= 0 and seen.find("\x1b[?25l", shown) > shown, seen  # shown, then hidden under the line again
    term.send(b"/exit\r")
    assert term.close() == 0
