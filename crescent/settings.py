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

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound="CrescentSettings")


def default_model_cache() -> Path:
    return Path.home() / ".cache" / "crescent" / "models"


class CrescentSettings(BaseSettings):
    """Fields every service shares."""

    model_config = SettingsConfigDict(env_prefix="CRESCENT_", extra="ignore", protected_namespaces=())

    host: str = Field("127.0.0.1", description="Address this service listens on.")
    log_level: str = Field("info", description="Logging level: debug, info, warning, error.")


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
