"""Tokenizer: chat template rendering, EOS ids, and streaming text that never splits a
multi-byte character."""

import json

from moespeq_cli.tokenizer import StreamDecoder, Tokenizer, stream_text


def make(tmp_path, tiny, **tok_cfg):
    src, _ = tiny("mixtral", "gqa")
    (tmp_path / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return Tokenizer(tmp_path, {"eos_token_id": 2})


def test_chat_template_renders_user_message(tmp_path, tiny):
    tpl = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    tok = make(tmp_path, tiny, chat_template=tpl, bos_token="<s>", eos_token="</s>")
    assert tok.render_chat("hi") == "<s>[INST] hi [/INST]"
    ids = tok.encode("hi", chat=True)
    assert ids[0] == 1  # "<s>" is a special token, encoded as its id
    assert tok.decode(ids) == "[INST] hi [/INST]"
    assert tok.eos_ids == {2}


def test_stream_decoder_holds_partial_utf8(tmp_path, tiny):
    tok = make(tmp_path, tiny)
    ids = tok.encode("né 😀 ok")
    d = StreamDecoder(tok)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == "né 😀 ok"
    assert all("\ufffd" not in p for p in pieces)


def llama_style(tmp_path):
    """A tokenizer as Llama's and Mistral's are: SentencePiece-style (``▁`` for a space,
    stripped at the start of a decode) with byte-fallback tokens ``<0x00>``..``<0xFF>``
    for characters not in its vocabulary, a run of them decoded together."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁the", "▁hello"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁", "h"), ("▁h", "e"), ("▁he", "l"), ("▁hel", "l")]
    merges += [("▁hell", "o")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    return Tokenizer(tmp_path, {"eos_token_id": 2})


def test_stream_decoder_keeps_sentencepiece_spaces_and_byte_fallback_characters(tmp_path):
    tok = llama_style(tmp_path)
    ids = tok.encode("hello the 😀 cat é the")
    assert tok.decode(ids) == "hello the 😀 cat é the"
    d = StreamDecoder(tok)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == "hello the 😀 cat é the" == stream_text(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    # An answer cut inside a second emoji: the byte-fallback decoder turns the whole run of
    # byte tokens into one U+FFFD a byte, the first emoji's too; the stream gave 😀 before
    # the cut and then the cut's two bytes, and the text the run reports is what it
    # printed (it printed 😀 and five replacement characters, and reported six).
    cut = tok.encode("😀😀")[:-2]
    assert tok.decode(cut) == "\ufffd" * 6
    assert stream_text(tok, cut) == "😀\ufffd\ufffd"


def test_stream_decoder_decodes_a_few_tokens_a_step(tmp_path, tiny):
    """Each step decodes the tokens since the last text it gave and those before it: a
    long answer's decoding grows with its length, where it grew with its square (every
    token so far decoded at each step)."""
    tok = make(tmp_path, tiny)
    ids = tok.encode("né 😀 ok, the quick brown fox. " * 60)  # ~2,000 tokens
    decoded = []
    plain = tok.decode
    tok.decode = lambda part: decoded.append(len(part)) or plain(part)
    assert stream_text(tok, ids) == plain(ids)
    assert sum(decoded) <= 8 * len(ids), (sum(decoded), len(ids))


# Templates using what transformers' template environment has beyond plain Jinja (as the
# templates of gpt-oss, Qwen3.5 or GLM-4.x do): today's date, {% break %} and {% continue %},
# JSON that is not HTML-escaped (keys in order, non-ASCII kept), {% generation %}.
TEMPLATES = {
    "date": '{{ "Current date: " + strftime_now("%Y-%m-%d") + "\\n" }}{% for m in messages %}{{ m.content }}{% endfor %}',
    "loop controls": (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{{ m.role }}: {{ m.content }}\n{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}"
    ),
    "json": "{% for m in messages %}{{ m | tojson }}{{ m | tojson(indent=2) }}{% endfor %}",
    "generation": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}"
        "{% endgeneration %}{% else %}<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
        "{% if tools is not none %}[tools]{% endif %}{% if documents is defined %}[documents defined]{% endif %}"
    ),
}
MESSAGES = [
    {"role": "system", "content": "Be <brief> & kind"},
    {"role": "user", "content": 'Grüße, 世界 "quoted"'},
    {"role": "assistant", "content": "Hallo"},
    {"role": "user", "content": "again"},
    {"role": "user", "content": "and again"},
]


def test_templates_render_as_transformers_renders_them():
    from transformers.utils.chat_template_utils import render_jinja_template

    from moespeq_cli.chat_template import render

    for name, tpl in TEMPLATES.items():
        ours = lambda tpl=tpl, name=name: render(  # noqa: E731
            tpl,
            name,
            messages=MESSAGES,
            tools=None,
            documents=None,
            add_generation_prompt=True,
            bos_token="<s>",
            eos_token="</s>",
        )
        before = ours()
        theirs = render_jinja_template(
            [MESSAGES], chat_template=tpl, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
        )[0][0]
        assert theirs in (before, ours()), name  # before and after: the date may turn in between


def test_chat_template_jinja_comes_first_as_in_transformers(tmp_path, tiny):
    """Checkpoints saved by transformers since 4.50 keep the template in
    chat_template.jinja (tokenizer_config.json then has none, or an older one); a
    multimodal checkpoint may keep its only template in the processor's chat_template.json."""
    from transformers import AutoTokenizer

    tok = make(tmp_path, tiny, chat_template="old {{ messages[0].content }}", bos_token="<s>", eos_token="</s>")
    assert tok.render_messages(MESSAGES[1:2]) == "old " + MESSAGES[1]["content"]
    (tmp_path / "chat_template.jinja").write_text(TEMPLATES["generation"])
    tok = Tokenizer(tmp_path, {"eos_token_id": 2})
    reference = AutoTokenizer.from_pretrained(tmp_path)
    want = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.render_messages(MESSAGES) == want and "chat_template.jinja" in str(tok.template_source)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATES["loop controls"]}))
    tok = Tokenizer(tmp_path, {"eos_token_id": 2})
    assert tok.render_messages(MESSAGES) == "user: " + MESSAGES[1]["content"] + "\nassistant: Hallo\n"


def test_a_hub_pull_brings_the_template_files():
    from moespeq_cli.hub import RUN_FILES

    assert {"chat_template.jinja", "chat_template.json"} <= set(RUN_FILES)
