"""Typed settings: one pydantic-settings class per service, every field documented.

Each field is read, in this order of precedence, from a CLI flag (``--field-name``), then the environment
(``CRESCENT_FIELD_NAME``), then its default. Services subclass :class:`CrescentSettings`; the CLI builds flags from
the class with :func:`add_settings_flags` and the values with :func:`settings_from_flags`.
"""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound="CrescentSettings")
MAX_INTERNAL_TOKEN_CHARS = 1024  # the kvstore data port refuses a longer handshake before reading it


def default_model_cache() -> Path:
    return Path.home() / ".cache" / "crescent" / "models"


def read_secret_file(path: str, field: str) -> str:
    """A secret from a file (a mounted Kubernetes Secret), surrounding whitespace dropped; ValueError naming
    ``field`` when it cannot be read."""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"{field} {path}: {exc.strerror}") from None


class CrescentSettings(BaseSettings):
    """Fields every service shares."""

    # hide_input_in_errors: a model-level error would otherwise print every input, internal_token in clear
    model_config = SettingsConfigDict(env_prefix="CRESCENT_", extra="ignore", protected_namespaces=(),
                                      hide_input_in_errors=True)

    host: str = Field("127.0.0.1", description="Address this service listens on.")
    log_level: str = Field("info", description="Logging level: debug, info, warning, error.")
    internal_token: SecretStr = Field(
        SecretStr(""), description="Shared secret of internal traffic: every gRPC call between services and every "
        "kvstore data connection must carry it (health and /metrics stay open). Empty = no authentication (a "
        "warning at start). Prefer the env var or internal_token_file: a flag shows in the process list.",
    )
    internal_token_file: str = Field(
        "", description="A file holding internal_token (a mounted Kubernetes Secret); read at start, surrounding "
        "whitespace dropped. Set this or internal_token, not both.",
    )

    @model_validator(mode="after")
    def _read_internal_token(self) -> CrescentSettings:
        if self.internal_token_file:
            if self.internal_token.get_secret_value():
                raise ValueError("set internal_token or internal_token_file, not both")
            text = read_secret_file(self.internal_token_file, "internal_token_file")
            if not text:  # starting open because a mount came up empty would be a silent hole
                raise ValueError(f"internal_token_file {self.internal_token_file} is empty")
            self.internal_token = SecretStr(text)
        token = self.internal_token.get_secret_value()
        # it travels as a gRPC metadata value and in a data-port frame: printable ASCII, no spaces, bounded
        if token and not (token.isascii() and token.isprintable() and " " not in token
                          and len(token) <= MAX_INTERNAL_TOKEN_CHARS):
            raise ValueError(f"internal_token must be printable ASCII without spaces, at most "
                             f"{MAX_INTERNAL_TOKEN_CHARS} characters (secrets.token_urlsafe() makes one)")
        return self

    def internal_token_value(self) -> str:
        """The internal token in clear ('' = no authentication), for the services' servers and clients."""
        return self.internal_token.get_secret_value()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or (typing.get_origin(annotation) is typing.Union and bool in typing.get_args(annotation))


def add_settings_flags(parser: argparse.ArgumentParser, cls: type[CrescentSettings]) -> None:
    """One optional flag per field; unset flags fall through to the environment and the default."""
    for name, info in cls.model_fields.items():
        help_text = f"{info.description or ''} (env {cls.model_config.get('env_prefix', '')}{name.upper()})"
        if _is_bool(info.annotation):
            parser.add_argument(_flag(name), dest=name, default=None, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, default=None, help=help_text)


def settings_from_flags(cls: type[S], ns: argparse.Namespace) -> S:
    """Settings from parsed flags (those given) over the environment and defaults."""
    given: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        value = getattr(ns, name, None)
        if value is None:
            continue
        origin = typing.get_origin(info.annotation)
        if isinstance(value, str) and origin in (list, dict):
            value = json.loads(value)
        given[name] = value
    return cls(**given)
