import pytest

import minfer
from minfer.tokenizer import StreamDecoder, Tokenizer

TEXTS = ["Hello world!", "naïve café, 日本語, emoji 🙂👍🏽", "def f(x):\n\tif x:\n        return 1\n",
         "many   spaces\n\n\nand lines", "<|im_start|>user\nhi<|im_end|>", "digits 12345 and 3.14"]


def test_gguf_and_tokenizer_json_agree(tiny_hf, tiny_gguf):
    """The tokenizer built from GGUF metadata == the one read from tokenizer.json."""
    a = minfer.LLM(tiny_hf).tokenizer
    b = minfer.LLM(tiny_gguf).tokenizer
    for t in TEXTS:
        assert a.encode(t) == b.encode(t), t
        assert b.decode(b.encode(t), skip_special_tokens=False) == t
    assert a.stop_ids == b.stop_ids == {2}


def test_special_tokens_are_single_ids(tiny_llm):
    ids = tiny_llm.tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2


@pytest.mark.parametrize("text", ["emoji 🙂👍🏽 done", "日本語テキスト", "plain"])
def test_stream_decoder_never_breaks_utf8(tiny_llm, text):
    tok = tiny_llm.tokenizer
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_chat_template_is_sandboxed(tiny_llm):
    from minfer.errors import ModelFormatError
    tok = tiny_llm.tokenizer
    saved = tok.chat_template, tok._compiled
    try:
        tok.chat_template, tok._compiled = "{{ messages.__class__.__mro__[1].__subclasses__() }}", None
        with pytest.raises(ModelFormatError):
            tok.apply_chat_template([{"role": "user", "content": "x"}])
    finally:
        tok.chat_template, tok._compiled = saved


def test_hf_folder_chat_template_jinja(tmp_path):
    """transformers saves the chat template as chat_template.jinja beside tokenizer_config.json:
    it is the model's template (ChatML was used instead)."""
    from minfer.weights import synthetic
    folder = synthetic.tiny_checkpoint(tmp_path)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}", encoding="utf-8")
    tok = Tokenizer.from_hf_folder(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("[user] hi\n")


@pytest.mark.parametrize("edit,error", [
    ({"tokenizer.ggml.pre": "qwen2"}, "pre-tokenizer 'qwen2'"),          # another text split
    ({"tokenizer.ggml.pre": "totally-unknown"}, "pre-tokenizer 'totally-unknown'"),
    ({"tokenizer.ggml.model": "llama"}, "SentencePiece"),
    ({"tokenizer.ggml.model": None}, "no tokenizer"),
])
def test_gguf_tokenizers_minfer_cannot_split_like_are_refused(tmp_path, edit, error):
    """A GGUF whose pre-tokenizer minfer does not implement was tokenized with GPT-2's split,
    silently (other ids than the model was trained on)."""
    from minfer.errors import MinferError
    from minfer.weights import synthetic
    from minfer.weights.gguf import read_gguf
    meta, _ = read_gguf(synthetic.tiny_checkpoint(tmp_path, fmt="gguf"))
    Tokenizer.from_gguf_metadata(dict(meta, **{"tokenizer.ggml.pre": "gpt2"}))     # fine
    meta = {k: v for k, v in dict(meta, **edit).items() if v is not None}
    with pytest.raises(MinferError, match=error):
        Tokenizer.from_gguf_metadata(meta)


def test_hf_folder_bos_from_the_post_processor(tmp_path):
    """Llama 3 folders add BOS in tokenizer.json's post-processor, with no add_bos_token in
    tokenizer_config.json: a raw prompt starts with it, as transformers encodes it."""
    import json
    from minfer.weights import synthetic
    folder = synthetic.tiny_checkpoint(tmp_path)
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    bos = synthetic.SPECIAL_TOKENS[synthetic.BOS_ID]
    tj["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                            "special_tokens": {bos: {"id": bos, "ids": [synthetic.BOS_ID], "tokens": [bos]}}}
    (folder / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    tc = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert Tokenizer.from_hf_folder(folder).encode("hi", add_special_tokens=True)[0] != synthetic.BOS_ID
    del tc["add_bos_token"]                     # said: false wins; unsaid: the post-processor's
    (folder / "tokenizer_config.json").write_text(json.dumps(tc), encoding="utf-8")
    tok = Tokenizer.from_hf_folder(folder)
    assert tok.encode("hi", add_special_tokens=True) == [synthetic.BOS_ID] + tok.encode("hi")
