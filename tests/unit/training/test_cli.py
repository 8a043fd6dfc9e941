"""``crescent train``: flags -> settings, publishing from the pretrain command, clear failures."""

from __future__ import annotations

import json
from pathlib import Path

from crescent.models.published import latest_version, validate_checkpoint
from crescent.training.cli import train_cli
from tests.unit.training.helpers import TINY


def _flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, json.dumps(value) if isinstance(value, list) else str(value)]
    return out


def test_pretrain_command_publishes_a_valid_version(tmp_path: Path, capsys):
    flags = _flags({**TINY, "steps": 4, "checkpoint_every": 2})
    code = train_cli(["pretrain", "--out-dir", str(tmp_path / "run"), "--model-dir", str(tmp_path / "models"),
                      "--model-name", "tiny", *flags])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 4
    latest = latest_version(tmp_path / "models" / "tiny")
    assert latest is not None and latest.name == "v000004"
    assert (tmp_path / "models" / "tiny" / "v000002").is_dir()
    validate_checkpoint(latest)


def test_bad_input_is_a_clear_error_not_a_crash(tmp_path: Path, capsys):
    assert train_cli(["pretrain", "--steps", "many"]) == 2
    assert "invalid settings" in capsys.readouterr().err
    assert train_cli(["rl", "--init-from", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "rl")]) == 1
    assert "run `crescent train pretrain` first" in capsys.readouterr().err
