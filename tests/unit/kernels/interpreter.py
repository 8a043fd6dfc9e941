"""Loading the MoBA Triton kernels for tests: on CPU under the Triton interpreter, on CUDA compiled.

Triton reads TRITON_INTERPRET when it is imported and when kernels are decorated, and again at launch. So a test
module loads its kernel modules with :func:`load_kernels` (the variable set only around the import) and sets it
again only while its own tests run (:func:`interpreter_mode` in a module fixture); other test files see the
environment unchanged. Should triton have been imported compiled-mode by someone else first (CPU only),
:func:`load_kernels` returns None and the module re-runs itself with :func:`run_in_fresh_interpreter`.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import pytest
import torch

INTERPRET = not torch.cuda.is_available()
DEV = "cpu" if INTERPRET else "cuda"
# what the forward-and-backward (training) kernel tests load
TRAINING_KERNELS = ["crescent.kernels.moba.routing_triton", "crescent.kernels.moba.prefill_triton",
                    "crescent.kernels.moba.backward_triton", "crescent.kernels.moba.autograd"]


def _set_env(value: str | None) -> str | None:
    prev = os.environ.get("TRITON_INTERPRET")
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value
    return prev


@contextmanager
def interpreter_mode() -> Iterator[None]:
    """TRITON_INTERPRET=1 inside (on CPU only), the previous value restored after."""
    prev = _set_env("1") if INTERPRET else os.environ.get("TRITON_INTERPRET")
    try:
        yield
    finally:
        _set_env(prev)


def load_kernels(modules: list[str]) -> list[ModuleType] | None:
    """The kernel modules, (re)imported in interpreter mode on CPU; None when triton was already imported
    compiled-mode in this process (the caller then re-runs in a fresh process)."""
    with interpreter_mode():
        import triton
        from triton.runtime.interpreter import InterpretedFunction

        if INTERPRET and not isinstance(triton.language.standard.sum, InterpretedFunction):
            return None
        return [importlib.reload(sys.modules[m]) if m in sys.modules else importlib.import_module(m)
                for m in modules]


def run_in_fresh_interpreter(test_file: str) -> None:
    """Run ``test_file`` in a new pytest process with TRITON_INTERPRET=1 and assert it passes."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test_file],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def kernels_marker(mods: list[ModuleType] | None) -> pytest.MarkDecorator:
    """Skip a test here when the kernels could not load; the fresh-process re-run then covers it."""
    return pytest.mark.skipif(mods is None, reason="re-run in a fresh process by test_in_fresh_interpreter")


@pytest.fixture(autouse=True, scope="module")
def interpreter_env() -> Iterator[None]:
    """Import it into a kernel test module: TRITON_INTERPRET=1 (on CPU) while that module's tests run."""
    with interpreter_mode():
        yield


def fresh_interpreter_test(mods: list[ModuleType] | None, test_file: str):
    """The module's ``test_in_fresh_interpreter``: runs ``test_file`` in a new process when the kernels did not
    load in this one (skipped when they did)."""

    @pytest.mark.skipif(mods is not None, reason="the kernels loaded in interpreter mode in this process")
    def test_in_fresh_interpreter() -> None:
        run_in_fresh_interpreter(test_file)

    return test_in_fresh_interpreter


def rel_err(a: torch.Tensor, b: torch.Tensor, what: str = "output") -> float:
    """||a - b|| / ||b|` in float64 on the CPU; a NaN in ``a`` (an element a kernel never wrote) fails."""
    assert not torch.isnan(a).any(), f"{what} has NaN: an element was never written"
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
