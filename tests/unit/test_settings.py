import argparse

import pytest
from pydantic import Field

from crescent.settings import CrescentSettings, add_settings_flags, settings_from_flags


class DemoSettings(CrescentSettings):
    port: int = Field(1234, description="Port.")
    verbose: bool = Field(False, description="Chatty.")
    names: list[str] = Field(default_factory=list, description="Names.")


def parse(argv):
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, DemoSettings)
    return settings_from_flags(DemoSettings, parser.parse_args(argv))


def test_defaults_env_and_flags_precedence(monkeypatch):
    assert parse([]).port == 1234
    monkeypatch.setenv("CRESCENT_PORT", "4321")
    assert parse([]).port == 4321
    assert parse(["--port", "99"]).port == 99
    s = parse(["--verbose", "--names", '["a","b"]'])
    assert s.verbose is True and s.names == ["a", "b"]


def test_bad_value_is_a_clear_error():
    with pytest.raises(ValueError, match="port"):
        parse(["--port", "not-a-number"])
