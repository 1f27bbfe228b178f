"""Tokenizer: chat template rendering, EOS ids, and streaming text that never splits a
multi-byte character."""

import json

from moespeq_cli.tokenizer import StreamDecoder, Tokenizer


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
