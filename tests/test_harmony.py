"""gpt-oss's harmony format: the final channel is the answer, the others its reasoning
(moespeq_cli/harmony.py), through ``complete`` as chat and the server call it."""

import json
from types import SimpleNamespace

import pytest

from moespeq_cli.conversation import complete
from moespeq_cli.harmony import ChannelRouter
from moespeq_cli.tokenizer import Tokenizer

MARKERS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|constrain|>"]
WORDS = ["[UNK]", "analysis", "final", "commentary", "assistant", "The", "user", "greets", "me", "Hello", "there"]
WORDS += ["to=functions.f", "json", "{}"]


def harmony_tokenizer(tmp_path) -> Tokenizer:
    """A word-level tokenizer with harmony's markers as special tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(MARKERS)
    tok.save(str(tmp_path / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endfor %}<|start|>assistant"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return Tokenizer(tmp_path, {})


class Scripted:
    """An engine that generates the given tokens."""

    last_stats = None

    def __init__(self, tokenizer, ids):
        self.tokenizer, self.ids = tokenizer, ids

    def generate(self, prompt_ids, n, sampling, reuse=False):
        for t in self.ids[:n]:
            yield SimpleNamespace(token=t, eos=False)


ANSWER = (
    "<|channel|> analysis <|message|> The user greets me <|end|> "
    "<|start|> assistant <|channel|> commentary to=functions.f <|constrain|> json <|message|> {} <|end|> "
    "<|start|> assistant <|channel|> final <|message|> Hello there"
)


def test_the_final_channel_is_the_answer_and_the_rest_reasoning(tmp_path):
    tok = harmony_tokenizer(tmp_path)
    ids = tok.tok.encode(ANSWER).ids
    shown, thought = [], []
    a = complete(Scripted(tok, ids), [0], 100, None, on_text=shown.append, on_reasoning=thought.append, channels=True)
    assert a.text == "".join(shown) == "Hello there"
    assert a.reasoning == "".join(thought) == "The user greets me\n{}"  # a line between two messages
    assert a.token_ids == ids and a.finish_reason == "length"
    # stop strings apply to the answer, not the reasoning ("me" is only reasoning)
    a = complete(Scripted(tok, ids), [0], 100, None, stops=["me", "there"], channels=True)
    assert a.text == "Hello " and a.finish_reason == "stop" and "greets me" in a.reasoning
    # a raw prompt (not through the template) may end anywhere: its answer is not split
    a = complete(Scripted(tok, ids), [0], 100, None)
    assert a.text == tok.decode(ids) and a.reasoning == ""
    # text after <|end|> that no <|start|> follows is still shown
    a = complete(
        Scripted(tok, tok.tok.encode("<|channel|> final <|message|> Hello <|end|> there").ids),
        [0],
        100,
        None,
        channels=True,
    )
    assert a.text == "Hello there"


def test_a_tokenizer_without_the_markers_has_no_channels(tmp_path, tiny):
    src, _ = tiny("mixtral", "gqa")
    (tmp_path / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    tok = Tokenizer(tmp_path, {})
    assert ChannelRouter.of(tok) is None
    ids = tok.encode("hello world")
    a = complete(Scripted(tok, ids), [0], 100, None)
    assert a.text == tok.decode(ids) and a.reasoning == ""


def test_the_server_gives_the_reasoning_apart(tmp_path):
    """``content`` is the answer and ``reasoning_content`` the rest (as vLLM and llama.cpp
    serve gpt-oss), streamed as ``delta.reasoning_content``."""
    import json

    from starlette.testclient import TestClient

    from moespeq_cli.server import build_app

    tok = harmony_tokenizer(tmp_path)
    app = build_app(Scripted(tok, tok.tok.encode(ANSWER).ids), "gpt-oss", 512)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    with TestClient(app, base_url="http://localhost") as client:
        message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert message == {
            "role": "assistant",
            "content": "Hello there",
            "refusal": None,
            "reasoning_content": "The user greets me\n{}",
        }
        with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
            deltas = [
                json.loads(line[6:])["choices"][0]["delta"]
                for line in r.iter_lines()
                if line.startswith("data: {") and '"choices": [{' in line
            ]
        assert "".join(d.get("content", "") for d in deltas) == "Hello there"
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user greets me\n{}"
        # a completion continues a raw prompt: its text as generated, not split
        text = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 100}).json()["choices"][0]["text"]
        assert text == tok.decode(tok.tok.encode(ANSWER).ids)


def test_reasoning_without_an_answer_ends_its_line(capsys):
    """gpt-oss's reasoning can use up the answer's tokens: the stats line (run) or the
    next prompt (chat) must not be glued to it."""
    from moespeq_cli.cli.render import Renderer

    out = Renderer()
    out.reasoning("The user")
    out.text("")
    out.end_text()
    assert capsys.readouterr().err == "The user\n"


THINK_WORDS = ["[UNK]", "Hmm", "the", "user", "greets", "me", "Hello", "there", "<|user|>", "<|assistant|>", "hi"]


def think_tokenizer(tmp_path, special: bool, opens: bool) -> Tokenizer:
    """A word-level tokenizer with ``<think>`` and ``</think>`` as added tokens (special or
    not: Qwen3's are not), and a template that opens the think block (``opens``: DeepSeek-R1's
    and the Qwen3 thinking models') or leaves it to the model."""
    from tokenizers import AddedToken, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(THINK_WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    marks = [AddedToken(m, special=special) for m in ("<think>", "</think>")]
    if special:
        tok.add_special_tokens(marks)
    else:
        tok.add_tokens(marks)
    tok.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}<|user|> {{ m.content }} {% endfor %}<|assistant|>" + (
        " <think>" if opens else ""
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return Tokenizer(tmp_path, {})


@pytest.mark.parametrize("special", [True, False])
@pytest.mark.parametrize("opens", [True, False])
def test_a_think_block_is_the_reasoning(tmp_path, special, opens):
    """Qwen3, GLM-4.x, DeepSeek-R1: the text in <think>...</think> is the reasoning, the
    rest the answer, whether the markers are special tokens (skipped when decoded) or not,
    and whether the template opened the block in the prompt or the model does."""
    tok = think_tokenizer(tmp_path, special, opens)
    prompt = tok.encode_messages([{"role": "user", "content": "hi"}])
    said = ("" if opens else "<think> ") + "Hmm the user greets me </think> Hello there"
    ids = tok.tok.encode(said, add_special_tokens=False).ids
    shown, thought = [], []
    a = complete(
        Scripted(tok, ids), prompt, 100, None, on_text=shown.append, on_reasoning=thought.append, channels=True
    )
    assert a.reasoning == "".join(thought) == "Hmm the user greets me"
    assert a.text == "".join(shown) == "Hello there"
    assert "think>" not in a.text + a.reasoning
    # a raw prompt (no template): no split
    raw = complete(Scripted(tok, ids), prompt, 100, None, channels=False)
    assert raw.reasoning == "" and "Hello there" in raw.text
    # thinking switched off by the template (Qwen3's enable_thinking: an empty block in the prompt)
    closed = tok.tok.encode("<|user|> hi <|assistant|> <think> </think>", add_special_tokens=False).ids
    plain = tok.tok.encode("Hello there", add_special_tokens=False).ids
    a = complete(Scripted(tok, plain), closed, 100, None, channels=True)
    assert a.text == "Hello there" and a.reasoning == ""
    # the budget ends inside the block: all reasoning, no answer
    a = complete(Scripted(tok, ids[: 4 if opens else 5]), prompt, 100, None, channels=True)
    assert a.text == "" and a.reasoning.startswith("Hmm the")


def test_an_answer_without_a_think_block_keeps_its_leading_whitespace(tmp_path):
    """A tokenizer with the markers answering without a block (a non-thinking model of a
    thinking family): its answer is as generated, indentation included; and a special
    token after a literal "<think>" in the prompt is not whitespace (the answer does not
    start inside a block)."""
    from tiny_models import byte_tokenizer_json
    from tokenizers import Tokenizer as HFTokenizer

    from moespeq_cli.harmony import Split, ThinkRouter

    raw = HFTokenizer.from_str(json.dumps(byte_tokenizer_json()))
    raw.add_tokens(["<think>", "</think>"])
    (tmp_path / "b").mkdir()
    raw.save(str(tmp_path / "b" / "tokenizer.json"))
    byte = Tokenizer(tmp_path / "b", {})
    for said, want in (("    return x\n", "    return x\n"), ("<think>hm</think>\n\n  return x", "  return x")):
        ids = byte.tok.encode(said, add_special_tokens=False).ids
        split = Split(byte, True, byte.tok.encode("hi", add_special_tokens=False).ids)
        shown = "".join(split.push(t)[0] for t in ids) + split.flush()[0]
        assert shown == want, (said, shown)
    tok = think_tokenizer(tmp_path, special=False, opens=False)
    tok.tok.add_special_tokens(["<|gen|>"])
    prompt = tok.tok.encode("<|user|> hi <think> <|gen|>", add_special_tokens=True).ids
    assert ThinkRouter.of(tok, prompt).channel == "final"


def test_a_think_blocks_reasoning_ends_without_its_trailing_newlines(tmp_path):
    """The newlines a model puts before </think> are not reasoning (a stream of it showed
    a blank line before the answer); newlines inside the reasoning are kept, and a second
    block's reasoning comes a line after the first's."""
    from tiny_models import byte_tokenizer_json
    from tokenizers import Tokenizer as HFTokenizer

    from moespeq_cli.harmony import Split

    raw = HFTokenizer.from_str(json.dumps(byte_tokenizer_json()))
    raw.add_tokens(["<think>", "</think>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    byte = Tokenizer(tmp_path, {})
    prompt = byte.tok.encode("hi", add_special_tokens=False).ids
    for said, answer, reasoning in (
        ("<think>\nhm\n\nok\n\n</think>\n\nHello", "Hello", "hm\n\nok"),
        ("<think>a\r\n</think>b<think>\nc\n</think>\nd", "bd", "a\nc"),
        ("<think>\nstill thinking\n", "", "still thinking"),  # the budget ends inside
    ):
        split = Split(byte, True, prompt)
        pieces = [split.push(t) for t in byte.tok.encode(said, add_special_tokens=False).ids] + [split.flush()]
        assert "".join(p[0] for p in pieces) == answer, said
        assert "".join(p[1] for p in pieces) == reasoning, said


def test_run_json_gives_the_reasoning_apart(cli, tiny, tmp_path):
    """`run --json`'s text is decoded with the markers skipped, so a script could not tell
    a think block's reasoning from the answer: --json gives the reasoning (null where no
    split applies: a raw prompt)."""
    import shutil

    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    src, _ = tiny("mixtral", "gqa")  # its vocabulary has unused ids for the two markers
    model = tmp_path / "thinker"
    shutil.copytree(src, model)
    tok = HFTokenizer.from_file(str(model / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<think>", special=True), AddedToken("</think>", special=True)])
    tok.save(str(model / "tokenizer.json"))
    template = "{% for m in messages %}{{ m.content }}\n{% endfor %}<think>\n"
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    r = cli(
        "run", str(model), "-p", "ROMEO:", "-n", "6", "--chat", "--json", "--backend", "cpu", "--seed", "3", "-t", "1"
    )
    out = json.loads(r.stdout)
    assert r.exit_code == 0 and out["reasoning"], r.stderr  # the answer begins inside the opened block
    assert out["reasoning"] == out["text"].lstrip("\r\n").rstrip("\r\n")
    r = cli(
        "run",
        str(model),
        "-p",
        "ROMEO:",
        "-n",
        "6",
        "--no-chat",
        "--json",
        "--backend",
        "cpu",
        "--seed",
        "3",
        "-t",
        "1",
    )
    assert json.loads(r.stdout)["reasoning"] is None
