"""A byte-level BPE tokenizer with no merges (one token per UTF-8 byte), built offline with ``tokenizers``.

Multi-byte characters (emoji, CJK) span several tokens, which is exactly what incremental detokenization must get
right. Token 256 is an EOS special token.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

EOS = 256


class ByteTokenizer:
    def __init__(self) -> None:
        alphabet = ByteLevel.alphabet()
        # ByteLevel.alphabet() is unordered: order by the byte each printable stand-in represents
        table = _bytes_to_unicode()
        vocab = {table[b]: b for b in range(256)}
        assert set(vocab) == set(alphabet)
        self.tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tok.decoder = decoders.ByteLevel()
        self.tok.add_special_tokens(["<eos>"])
        self.eos_token_ids = [EOS]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}
