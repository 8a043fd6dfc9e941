"""Import the scripts under deploy/ (a folder of tools, not a package) by path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"


def load(relative: str) -> ModuleType:
    """deploy/<relative>.py as a module, imported once."""
    name = "crescent_deploy_" + relative.replace("/", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DEPLOY / f"{relative}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
