"""A small byte-level BPE tokenizer trained with HF ``tokenizers``, with a ChatML chat template.

Digits are split one per token before BPE: merged digit groups ("198", "42") would hide place value from a
small model and make arithmetic much harder to learn. The template is the ChatML one SmolLM2 uses, so the serving
side renders our model's prompts with the same code path as the default model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import jinja2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TEMPLATE = jinja2.Environment(autoescape=False).from_string(CHAT_TEMPLATE)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return _TEMPLATE.render(messages=messages, add_generation_prompt=add_generation_prompt)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Train byte-level BPE on ``texts``; ids 0..2 are the special tokens."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def special_id(tok: Tokenizer, token: str) -> int:
    idx = tok.token_to_id(token)
    if idx is None:
        raise ValueError(f"tokenizer has no special token {token!r}")
    return idx


def save_tokenizer(tok: Tokenizer, folder: Path, max_length: int) -> None:
    """Write tokenizer.json and an HF tokenizer_config.json carrying the chat template and special tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": EOS,
        "unk_token": None,
        "model_max_length": max_length,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(special_id(tok, t)): {"content": t, "special": True} for t in SPECIAL_TOKENS},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
