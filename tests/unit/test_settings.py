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


def test_internal_token_from_env_or_file_never_shown(tmp_path, monkeypatch):
    monkeypatch.delenv("CRESCENT_INTERNAL_TOKEN", raising=False)
    monkeypatch.delenv("CRESCENT_INTERNAL_TOKEN_FILE", raising=False)
    assert parse([]).internal_token_value() == ""
    monkeypatch.setenv("CRESCENT_INTERNAL_TOKEN", "from-env")
    settings = parse([])
    assert settings.internal_token_value() == "from-env"
    assert "from-env" not in repr(settings) and "from-env" not in str(settings.model_dump())
    monkeypatch.delenv("CRESCENT_INTERNAL_TOKEN")
    secret = tmp_path / "token"
    secret.write_text("from-file\n")  # a mounted Secret often ends with a newline
    assert parse(["--internal-token-file", str(secret)]).internal_token_value() == "from-file"


@pytest.mark.parametrize("case, message", [
    ("both", "not both"), ("empty_file", "is empty"), ("missing_file", "No such file"), ("spaces", "without spaces"),
])
def test_bad_internal_token_settings_are_clear_errors_that_hide_the_value(tmp_path, monkeypatch, case, message):
    monkeypatch.delenv("CRESCENT_INTERNAL_TOKEN", raising=False)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    argv = {"both": ["--internal-token", "tok-value-1", "--internal-token-file", str(empty)],
            "empty_file": ["--internal-token-file", str(empty)],
            "missing_file": ["--internal-token-file", str(tmp_path / "nope")],
            "spaces": ["--internal-token", "tok value 1"]}[case]
    with pytest.raises(ValueError, match=message) as err:
        parse(argv)
    assert "value 1" not in str(err.value) and "value-1" not in str(err.value)
