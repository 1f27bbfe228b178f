"""gpt-oss's harmony format: the final channel is the answer, the others its reasoning
(moespeq_cli/harmony.py), through ``complete`` as chat and the server call it."""

import json
from types import SimpleNamespace

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
    with TestClient(app) as client:
        message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert message == {"role": "assistant", "content": "Hello there", "reasoning_content": "The user greets me\n{}"}
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
