"""Tokenizer + chat template, read from a model folder (tokenizer.json, tokenizer_config.json).

The chat template is rendered the way HF transformers' ``apply_chat_template`` renders it, to the character (a
parity test holds it to that): a sandboxed jinja2 environment with ``trim_blocks``/``lstrip_blocks``, loop controls
(``break``/``continue``), a ``{% generation %}`` block (rendered as its body), a ``tojson`` that neither escapes HTML
nor sorts keys, ``raise_exception`` and ``strftime_now`` globals; in scope ``messages`` (keys whose value is None
dropped, as transformers does), ``tools``, ``documents``, ``add_generation_prompt`` and the special tokens
(``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
"""The special tokens tokenizer_config.json may name, in scope of the chat template."""


class ChatTemplateError(ValueError):
    """The chat template rejected the messages (e.g. it called raise_exception), or there is no template."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """jinja's own tojson escapes <, >, & and ' and sorts keys; templates are written against transformers'."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}`` marks the assistant's tokens for training masks; rendering it
    is rendering its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, chat_template: str | None = None, *,
                 bos_token: str | None = None, eos_token: str | None = None,
                 eos_token_ids: Iterable[int] = (), special_tokens: Mapping[str, str] | None = None,
                 tool_template: str | None = None) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        """Special tokens the template sees by name (bos/eos given apart win)."""
        self.special_tokens.update({k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v})
        ids = set(eos_token_ids)
        if eos_token is not None and (eos_id := tokenizer.token_to_id(eos_token)) is not None:
            ids.add(eos_id)
        self.eos_token_ids: set[int] = ids
        self.tool_template = tool_template
        """A named "tool_use" template: what transformers renders instead when tools are given."""
        self._template = _compile(chat_template) if chat_template else None
        self._tool_template = _compile(tool_template) if tool_template else None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (required) and, when present, tokenizer_config.json, chat_template.jinja and
        the eos ids of config.json / generation_config.json."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} is missing: a model folder needs its tokenizer.json")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust side raises bare Exceptions
            raise ValueError(f"{tok_file} is not a valid tokenizers JSON file: {exc}") from exc
        tcfg = _read_json(folder / "tokenizer_config.json")
        template, tool_template = tcfg.get("chat_template"), None
        if isinstance(template, list):  # HF's named-template form: "default", and "tool_use" when tools are given
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template, tool_template = named.get("default"), named.get("tool_use")
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        eos_ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            eos = _read_json(folder / name).get("eos_token_id")
            eos_ids.update([eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)])
        return cls(tok, template, bos_token=_token_text(tcfg.get("bos_token")),
                   eos_token=_token_text(tcfg.get("eos_token")), eos_token_ids=eos_ids,
                   special_tokens={k: _token_text(tcfg.get(k)) for k in SPECIAL_TOKENS}, tool_template=tool_template)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special-token text (``<|im_start|>``) becomes its single id; ``add_special_tokens`` adds BOS etc."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}]``) into the prompt text; ``kwargs`` (``tools``,
        ``documents``, template options) are in the template's scope too."""
        template = self._tool_template if kwargs.get("tools") is not None and self._tool_template else self._template
        if template is None:
            raise ChatTemplateError("this model has no chat template (tokenizer_config.json 'chat_template'): "
                                    "use the completions API or add a template to the model folder")
        scope = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        try:
            return template.render(messages=[{k: v for k, v in m.items() if v is not None} for m in messages],
                                   add_generation_prompt=add_generation_prompt, **scope)
        except Exception as exc:  # a template is user data: any failure is a bad request, never a crash
            raise ChatTemplateError(f"chat template rejected the messages: {exc}") from exc


def _compile(template: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}
