"""services/common/tokenizer.py: chat template conventions and errors (tokenizer built in-test, no files)."""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from crescent.models.tokenizer import ChatTemplateError, Tokenizer

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
    "{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _backend() -> HFTokenizer:
    tok = HFTokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return tok


def test_template_conventions():
    tok = Tokenizer(_backend(), TEMPLATE, bos_token="<s>", eos_token="</s>")
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}]) == "<s>user: hello</s>\nassistant:"
    assert tok.eos_token_ids == {tok.token_to_id("</s>")}
    with pytest.raises(ChatTemplateError, match="no tools here"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_sandbox_blocks_unsafe_templates():
    tok = Tokenizer(_backend(), "{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_template_is_a_clear_error_and_special_decode():
    tok = Tokenizer(_backend())
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    ids = tok.encode("<s>hello world</s>")
    assert tok.decode(ids) == "hello world" and tok.id_to_token(ids[0]) == "<s>"


def test_from_dir_reads_configs(tmp_path):
    _backend().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": TEMPLATE}], "eos_token": {"content": "</s>"},
         "bos_token": "<s>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_ids == {1, 2, tok.token_to_id("</s>")} and tok.vocab_size == 5
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False).startswith("<s>")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "nowhere")
