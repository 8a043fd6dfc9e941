"""The prompt-size bound that lets the gateway refuse a hopeless prompt without tokenizing it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from crescent.models.tokenizer import Tokenizer
from crescent.services.gateway.errors import ApiError
from crescent.services.gateway.tokens import PromptEncoder, bytes_per_token_bound

CORPUS = ["the quick brown fox jumps over the lazy dog;    indented    code\n\n", "héllo wörld 👋 " * 3,
          "1234567890 " * 4]


def _byte_level(normalizer=None) -> Tokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=["<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    return Tokenizer(tok)


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    return _byte_level()


def test_bound_is_the_longest_piece_or_added_token(byte_level):
    vocab = byte_level.backend.get_vocab(with_added_tokens=False)
    assert bytes_per_token_bound(byte_level) == max(max(map(len, vocab)), len("<|im_start|>"))


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(min_size=1, max_size=300), st.text(alphabet=" \nthe<|im_start|>", min_size=1,
                                                                  max_size=300)))
def test_no_text_packs_more_bytes_into_a_token_than_the_bound(byte_level, text):
    ids = byte_level.encode(text)
    assert len(text) <= len(ids) * bytes_per_token_bound(byte_level)


def test_no_bound_without_a_byte_level_guarantee(byte_level):
    assert bytes_per_token_bound(_byte_level(normalizers.Lowercase())) is None
    assert bytes_per_token_bound(object()) is None  # a tokenizer that exposes no backend


class CountingTokenizer(Tokenizer):
    calls = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        CountingTokenizer.calls += 1
        return super().encode(text, add_special_tokens)


def test_an_oversized_prompt_is_refused_without_tokenizing(byte_level):
    tok = CountingTokenizer(byte_level.backend, "{% for m in messages %}{{ m.content }}{% endfor %}")
    encoder = PromptEncoder(tok, max_model_len=10)
    limit = encoder.max_prompt_chars
    assert limit == 10 * bytes_per_token_bound(tok)
    assert encoder.text_ids("a" * limit)  # at the bound: tokenized (and then judged by its token count)
    calls = CountingTokenizer.calls
    for call in (lambda: encoder.text_ids("a" * (limit + 1)),
                 lambda: encoder.chat_ids([{"role": "user", "content": "a" * (limit + 1)}])):
        with pytest.raises(ApiError) as refused:
            call()
        assert refused.value.status == 400 and refused.value.code == "context_length_exceeded"
    assert CountingTokenizer.calls == calls


def test_the_gateway_app_builds_without_importing_torch():
    from crescent.models.prepare import ensure_default_model

    folder = ensure_default_model()  # converted here (with torch) if this machine never did it
    code = ("import sys\n"
            "from crescent.services.gateway.server import create_app\n"
            "from crescent.services.gateway.settings import GatewaySettings\n"
            "create_app(GatewaySettings(model='default'))\n"
            "create_app(GatewaySettings(model=sys.argv[1]))\n"
            "assert 'torch' not in sys.modules, 'the gateway imported torch'\n")
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
