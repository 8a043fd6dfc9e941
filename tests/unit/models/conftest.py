from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted SmolLM2 in the default cache (converted on first use, ~10 s; reused afterwards)."""
    from crescent.models.prepare import ensure_default_model  # lazily: GPU-only runs lack the service deps

    return ensure_default_model()


@pytest.fixture(scope="session")
def default_model(default_model_dir):
    from crescent.models.loader import load_model

    return load_model(default_model_dir)
