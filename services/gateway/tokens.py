"""Prompt -> token ids (chat template or raw text) and token id -> display string, for the gateway.

The gateway is the only service that sees text on the way in; workers get token ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from crescent.models.registry import resolve_model_path
from crescent.models.tokenizer import Tokenizer
from crescent.services.gateway.errors import ApiError


class TokenizerLike(Protocol):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str | list[int]: ...


class PromptEncoder:
    """Wraps the model's tokenizer with the checks the API needs (context length, empty prompts)."""

    def __init__(self, tokenizer: TokenizerLike, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._token_str: dict[int, str] = {}
        bound = bytes_per_token_bound(tokenizer)
        self.max_prompt_chars = None if bound is None else max_model_len * bound
        """Longer text cannot fit the context whatever its tokens: refused without spending seconds on it."""

    @property
    def tool_template(self) -> str | None:
        """The chat template a request with tools renders through: a named "tool_use" one, else the template."""
        return getattr(self.tokenizer, "tool_template", None) or getattr(self.tokenizer, "chat_template", None)

    @property
    def template_knows_tools(self) -> bool:
        """The chat template renders ``tools`` and ``tool_calls`` itself (else tools.py writes them as text)."""
        return "tools" in (self.tool_template or "")

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                 tools: list[dict] | None = None) -> list[int]:
        kwargs = {"tools": tools} if tools is not None else {}
        try:
            rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                          **kwargs)
        except Exception as exc:  # a template raising (e.g. on roles it forbids) is the client's mistake
            raise ApiError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
        if not isinstance(rendered, str):
            return list(rendered)
        self._refuse_oversized(rendered, "messages")
        return self.tokenizer.encode(rendered)

    def text_ids(self, prompt: str | list[int], add_special_tokens: bool | None = None) -> list[int]:
        """A completion prompt's ids; ``add_special_tokens`` None = as the completions API does (it adds none)."""
        if not isinstance(prompt, str):
            return list(prompt)
        self._refuse_oversized(prompt, "prompt")
        if add_special_tokens is None:
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    def _refuse_oversized(self, text: str, param: str) -> None:
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            raise ApiError(400, f"the prompt is {len(text)} characters long: more than this model's context of "
                                f"{self.max_model_len} tokens can hold", param=param, code="context_length_exceeded")

    def detokenize(self, ids: list[int]) -> str:
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if isinstance(vocab, int) and any(t >= vocab for t in ids):
            raise ApiError(400, f"token ids must be below the vocabulary size {vocab}", param="tokens")
        try:
            text = self.tokenizer.decode(ids)
        except Exception as exc:  # the tokenizer is the judge of which ids it can decode
            raise ApiError(400, f"cannot decode these token ids: {exc}", param="tokens") from exc
        return text.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate cannot travel as JSON

    def token_str(self, token_id: int) -> str:
        text = self._token_str.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self._token_str) < 200_000:
                self._token_str[token_id] = text
        return text

    def check_length(self, prompt_ids: list[int], max_tokens: int | None, param: str = "prompt") -> int:
        """Validate lengths and return the completion budget (``max_tokens`` or what the context leaves).

        An over-long prompt is a 400 ``context_length_exceeded`` naming ``param``, as OpenAI and vLLM answer."""
        n = len(prompt_ids)
        if n == 0:
            raise ApiError(400, "the prompt is empty", param=param)
        if n >= self.max_model_len:
            raise ApiError(400, f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens",
                           param=param, code="context_length_exceeded")
        room = self.max_model_len - n
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                           f"of {self.max_model_len} tokens", param="max_tokens", code="context_length_exceeded")
        return room if max_tokens is None else max_tokens


def bytes_per_token_bound(tokenizer: object) -> int | None:
    """The most bytes of prompt text one token can stand for, where the tokenizer guarantees a bound; else None.

    A byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2) without a normalizer puts every input byte into exactly one
    token, and a token stands for as many bytes as its vocabulary string has characters (one character per byte),
    or, for an added token, as its text has UTF-8 bytes. So a text of more characters (each at least a byte) than
    ``max_model_len`` times this bound cannot fit. Other tokenizers may drop or merge characters: no bound."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or backend.normalizer is not None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    pieces = max((len(piece) for piece in backend.get_vocab(with_added_tokens=False)), default=0)
    added = max((len(t.content.encode()) for t in backend.get_added_tokens_decoder().values()), default=0)
    return max(pieces, added, 1)


def model_context_len(model_dir: Path) -> int:
    """The context length from the model's config.json (``max_position_embeddings``)."""
    config = json.loads((model_dir / "config.json").read_text())
    return int(config.get("max_position_embeddings") or config.get("max_seq_len") or 2048)


def load_encoder(model: str, max_model_len: int = 0) -> tuple[PromptEncoder, Path]:
    """The tokenizer of ``model`` (a name the model registry resolves, or a folder), and that folder."""
    model_dir = Path(resolve_model_path(model))  # never converts: that needs torch (the workers' job)
    return PromptEncoder(Tokenizer.from_dir(model_dir), max_model_len or model_context_len(model_dir)), model_dir
